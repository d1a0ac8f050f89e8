"""An orthogonal rotation of each head's channels, applied before quantization (zero stored bytes).

Keys and values of a head are quantized as ``x @ R`` for a fixed orthogonal ``R`` ``[D, D]``. Attention
does not change if the query is rotated the same way and the output rotated back, because
``(q R) . (k R) = q . k`` and ``sum_t p_t (v_t R) R^T = sum_t p_t v_t``. What changes is the spread of
each channel: a few large outlier channels are mixed into all of them, so a 2-bit grid wastes fewer
levels on one extreme channel (the idea of QuaRot, Ashkboos et al., arXiv:2404.00456, here applied to
the cache only). ``R`` is the normalised Walsh-Hadamard matrix when ``D`` is a power of two, otherwise
a fixed seeded random orthogonal matrix; either is rebuilt from ``D`` alone, so nothing is stored.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=8)
def _matrix(dim: int) -> Tensor:
    if dim & (dim - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:  # Sylvester's construction
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / dim**0.5
    g = torch.Generator().manual_seed(dim)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotation(dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The orthogonal ``[dim, dim]`` matrix ``R`` (rows and columns of unit length)."""
    return _matrix(dim).to(device=device, dtype=dtype)


def rotate(x: Tensor) -> Tensor:
    """``x @ R`` over the last axis: ``[..., D]`` -> ``[..., D]``."""
    return x @ rotation(x.shape[-1], x.dtype, x.device)


def unrotate(x: Tensor) -> Tensor:
    """``x @ R^T``, the inverse of :func:`rotate`."""
    return x @ rotation(x.shape[-1], x.dtype, x.device).T
