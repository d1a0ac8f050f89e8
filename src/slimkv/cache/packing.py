"""Low-bit codes packed into bytes, and asymmetric group quantization (scale and zero point per group).

Packing (``bits`` in 2, 4, 8): ``8 // bits`` codes share a byte. The layout is *planar*: for a last
axis of ``n`` codes and ``p = 8 // bits`` planes, byte ``j`` holds codes ``j, j + n/p, j + 2n/p, ...``
at bit offsets ``0, bits, 2*bits, ...``. Unpacking is then ``p`` shift-and-mask passes, each giving a
contiguous block of the axis (no interleaving), which is what the attention kernel reads too.

Quantization of a group ``x`` (asymmetric, ``L = 2**bits - 1`` levels)::

    zero  = min(x)                 rounded *down* to float16
    scale = (max(x) - zero) / L    rounded *up* to float16
    code  = clamp(round((x - zero) / scale), 0, L)          (all 0 when the group is constant)
    x'    = code * scale + zero

Rounding the float16 parameters outward keeps every value of the group inside the grid, so
``|x - x'| <= scale / 2`` (plus float32 rounding) holds for the *stored* scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (2, 4, 8)
#: dtype of stored scales and zero points (2 bytes each, counted by the layers that hold them)
PARAM_DTYPE = torch.float16


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``[..., n]`` (each < 2**bits) -> packed uint8 ``[..., n * bits // 8]``."""
    check_bits(bits)
    planes = 8 // bits
    n = codes.shape[-1]
    if n % planes:
        raise ValueError(f"{bits}-bit packing needs a last axis divisible by {planes}, got {n}")
    codes = codes.to(torch.uint8)
    if planes == 1:
        return codes.contiguous()
    width = n // planes
    out = codes[..., :width].clone()
    for i in range(1, planes):
        out |= codes[..., i * width : (i + 1) * width] << (i * bits)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Packed uint8 ``[..., m]`` -> uint8 codes ``[..., m * 8 // bits]`` (inverse of :func:`pack`)."""
    check_bits(bits)
    planes = 8 // bits
    if planes == 1:
        return packed
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (i * bits)) & mask for i in range(planes)], dim=-1)


@dataclass(frozen=True)
class Quantized:
    """Codes of groups along the last axis and their parameters.

    codes: uint8 ``[..., groups, size]`` (unpacked); scale, zero: float16 ``[..., groups, 1]``
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.codes.float() * self.scale.float() + self.zero.float()).to(dtype)


def quantize(groups: Tensor, bits: int) -> Quantized:
    """Asymmetric quantization of every group along the last axis of ``groups`` ``[..., size]``.

    Returns codes ``[..., size]`` and float16 scale and zero ``[..., 1]`` (see the module docstring).
    """
    check_bits(bits)
    levels = (1 << bits) - 1
    x = groups.float()
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    zero = _round_half(lo, down=True)
    scale = _round_half((hi - zero.float()) / levels, down=False)
    # scale rounded up may still leave the top of the grid below `hi` by float32 rounding; step once more
    short = zero.float() + scale.float() * levels < hi
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = ((x - zero.float()) / safe).round().clamp_(0, levels)
    codes = torch.where(s > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    return Quantized(codes=codes, scale=scale, zero=zero)


def _round_half(x: Tensor, down: bool) -> Tensor:
    """float32 -> float16, rounded toward -inf (``down``) or +inf, never to the nearest."""
    h = x.to(PARAM_DTYPE)
    wrong = h.float() > x if down else h.float() < x
    target = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(h, target), h)
