"""Additive (residual) vector quantization with RoPE-commutative codebooks: the arithmetic of CommVQ.

Paper: Li et al., "CommVQ: Commutative Vector Quantization for KV Cache Compression", ICML 2025,
arXiv:2506.18879. The storage that uses this is ``cache/vq.py``; fitting is ``fit_codebooks``.

A head vector ``x`` of ``D`` channels is read as ``D/2`` complex numbers ``z_i = x_i + j x_{i+D/2}``,
the channel pairs RoPE rotates together (transformers' ``rotate_half`` layout): RoPE at position
``m`` is ``z_i -> z_i e^{j theta_i m}``. In that *real layout* multiplying by ``j`` is ``rotate_half``.

A vector is stored as its norm (float16) and ``S`` one-byte stage codes. Stage ``s`` of a head has
two half-codebooks ``alpha[s], beta[s]`` of ``HALF = 16`` complex vectors each, and code
``(A, B)`` (byte ``A << 4 | B``) stands for the codeword ``alpha[s, A] + j beta[s, B]``::

    x ~ norm * sum_s (alpha[s, A_s] + j beta[s, B_s])

Every codeword is, pair by pair, a complex number: as a 2x2 real matrix ``[[a, -b], [b, a]]`` it
commutes with every RoPE rotation, so ``RoPE_m(x^) = norm * sum_s RoPE_m(codeword)`` and a query's
product with each codeword (``conj(q_i) * c_i``, computed once per query) rotated by the key's
angle gives the logit: attention can be computed from codes (:func:`code_logits`). Codes are found
greedily, stage by stage, on the residual (the paper's residual additive quantization); with 16x16
combinations per stage the search is exhaustive and cheap.

Fitting (:func:`fit_codebooks`, hard EM): the E-step assigns each calibration vector the nearest of
the 256 combinations; the M-step solves the least-squares codebook update by block coordinate
descent (``alpha`` given ``beta``: mean of ``r - j beta_B`` over vectors coded ``A``; then
``beta``). Both steps never increase the squared error.
"""

from __future__ import annotations

import torch
from torch import Tensor

HALF = 16  # codewords per half-codebook: a stage code is one byte, A in the high nibble, B in the low
NORM_DTYPE = torch.float16
_CHUNK = 1 << 22  # distance-table elements computed at once (bounds memory while encoding)


def rotate_half(x: Tensor) -> Tensor:
    """Multiplication by ``j`` in the real layout: ``[x1, x2] -> [-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate ``x [..., L, D]`` by ``positions [..., L]`` at ``inv_freq [D/2]`` (negate it to undo)."""
    angle = positions[..., None].float() * inv_freq.to(x.device)  # [..., L, D/2]
    cos, sin = angle.cos().repeat(*[1] * (angle.dim() - 1), 2), angle.sin().repeat(*[1] * (angle.dim() - 1), 2)
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def pack_codes(a: Tensor, b: Tensor) -> Tensor:
    """Half indices ``a, b`` (each < 16) -> one uint8 code per stage."""
    return ((a.to(torch.uint8) << 4) | b.to(torch.uint8)).contiguous()


def unpack_codes(codes: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 codes -> half indices ``(a, b)`` as int64 (inverse of :func:`pack_codes`)."""
    return (codes >> 4).long(), (codes & 0xF).long()


def _one_hot(idx: Tensor) -> Tensor:
    """``[G, N, S]`` half indices -> ``[G, N, S * HALF]`` float32 one-hot rows (one 1 per stage)."""
    g, n, s = idx.shape
    flat = idx + torch.arange(s, device=idx.device) * HALF
    out = torch.zeros(g, n, s * HALF, device=idx.device)
    return out.scatter_(2, flat, 1.0)


def _stage_search(u: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest codeword of one stage: ``u [G, N, D]``, ``alpha, beta [G, HALF, D]`` -> ``a, b [G, N]``."""
    jb = rotate_half(beta)
    g, n, d = u.shape
    words = (alpha[:, :, None] + jb[:, None]).reshape(g, HALF * HALF, d)  # [G, 256, D], index A*HALF + B
    base = (words * words).sum(-1)[:, None]  # [G, 1, 256]
    step = max(1, _CHUNK // (g * HALF * HALF))
    best = torch.empty(g, n, dtype=torch.long, device=u.device)
    for lo in range(0, n, step):
        dist = torch.baddbmm(base, u[:, lo : lo + step], words.transpose(1, 2), alpha=-2.0)  # [G, n, 256]
        best[:, lo : lo + step] = dist.argmin(-1)
    return best // HALF, best % HALF


def encode(x: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Codes of vectors ``x [G, N, D]`` with codebooks ``alpha, beta [G, S, HALF, D]``.

    Returns codes ``[G, N, S]`` uint8 and norms ``[G, N]`` float16 (vectors are scaled by the stored
    float16 norm, so :func:`decode` reproduces exactly what was coded).
    """
    norms = x.float().norm(dim=-1).to(NORM_DTYPE)
    scale = norms.float()
    residual = x.float() / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    codes = []
    for s in range(alpha.shape[1]):
        a, b = _stage_search(residual, alpha[:, s], beta[:, s])
        residual = residual - alpha[:, s].gather(1, a[..., None].expand(*a.shape, alpha.shape[-1])) \
            - rotate_half(beta[:, s].gather(1, b[..., None].expand(*b.shape, beta.shape[-1])))
        codes.append(pack_codes(a, b))
    return torch.stack(codes, dim=-1), norms


def decode_unit(codes: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``sum_s alpha[s, A_s] + j beta[s, B_s]`` of codes ``[G, N, S]``: ``[G, N, D]`` float32 (norm 1 scale)."""
    a, b = unpack_codes(codes)
    g, s, _, d = alpha.shape
    x = _one_hot(a) @ alpha.reshape(g, s * HALF, d)
    return x + rotate_half(_one_hot(b) @ beta.reshape(g, s * HALF, d))


def decode(codes: Tensor, norms: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Vectors ``[G, N, D]`` float32 of codes ``[G, N, S]`` and norms ``[G, N]``."""
    return decode_unit(codes, alpha, beta) * norms.float()[..., None]


def code_logits(query: Tensor, codes: Tensor, norms: Tensor, positions: Tensor, alpha: Tensor,
                beta: Tensor, inv_freq: Tensor) -> Tensor:
    """``q . RoPE_m(key)`` for every query row and coded key, computed from the codes.

    query: [G, R, D] (RoPE applied); codes [G, N, S]; norms [G, N]; positions [N] or [G, N]
    Returns [G, R, N] float32. Each query's product with every codeword, ``conj(q_i) c_i`` per
    channel pair, is tabulated once (``[G, R, S*HALF, D/2]`` complex); a key's logit is the real part
    of its rows of the table, summed over stages, rotated by the key's angle and summed over pairs.
    By commutativity this equals the query's dot product with the rotated, dequantized key.
    """
    g, s, _, d = alpha.shape

    def cplx(x: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.complex(x1, x2)

    q = cplx(query).conj()[:, :, None]  # [G, R, 1, D/2]
    table_a = q * cplx(alpha.reshape(g, s * HALF, d))[:, None]  # [G, R, S*HALF, D/2]
    table_b = q * cplx(rotate_half(beta.reshape(g, s * HALF, d)))[:, None]
    a, b = unpack_codes(codes)
    summed = _one_hot(a).to(table_a.dtype)[:, None] @ table_a + _one_hot(b).to(table_b.dtype)[:, None] @ table_b
    angle = positions.float()[..., None] * inv_freq.to(query.device)  # [(G,) N, D/2]
    rot = torch.polar(torch.ones_like(angle), angle)
    rot = rot[:, None] if rot.dim() == 3 else rot[None, None]
    return (summed * rot).real.sum(-1) * norms.float()[:, None, :]


def fit_codebooks(x: Tensor, stages: int, iters: int = 8, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Fit residual codebooks to calibration vectors ``x [G, N, D]`` (one codebook set per group ``G``).

    Returns ``alpha, beta [G, stages, HALF, D]`` float32 and the relative squared error
    ``[G, stages]`` after each stage (``|x - x^|^2 / |x|^2`` over the calibration vectors).
    """
    gen = torch.Generator().manual_seed(seed)
    g, n, d = x.shape
    norms = x.float().norm(dim=-1, keepdim=True)
    residual = x.float() / norms.clamp_min(1e-12)
    total = (residual * residual).sum(dim=(1, 2))
    alphas, betas, errors = [], [], []
    for _ in range(stages):
        pick = torch.randint(0, n, (g, 2 * HALF), generator=gen)
        seeds = residual.gather(1, pick[..., None].expand(g, 2 * HALF, d))
        alpha, beta = seeds[:, :HALF].clone(), -rotate_half(seeds[:, HALF:]) * 0.5  # j*beta = half a sample
        for _ in range(iters):
            a, b = _stage_search(residual, alpha, beta)
            alpha = _cluster_means(residual - rotate_half(_rows(beta, b)), a, alpha)
            beta = -rotate_half(_cluster_means(residual - _rows(alpha, a), b, rotate_half(beta)))
        a, b = _stage_search(residual, alpha, beta)
        residual = residual - _rows(alpha, a) - rotate_half(_rows(beta, b))
        alphas.append(alpha)
        betas.append(beta)
        errors.append((residual * residual).sum(dim=(1, 2)) / total)
    return torch.stack(alphas, 1), torch.stack(betas, 1), torch.stack(errors, 1)


def _rows(book: Tensor, idx: Tensor) -> Tensor:
    """``book [G, HALF, D]`` rows at ``idx [G, N]`` -> ``[G, N, D]``."""
    return book.gather(1, idx[..., None].expand(*idx.shape, book.shape[-1]))


def _cluster_means(target: Tensor, idx: Tensor, previous: Tensor) -> Tensor:
    """Mean of ``target [G, N, D]`` per cluster ``idx [G, N]``; empty clusters keep ``previous``."""
    onehot = torch.zeros(*idx.shape, HALF, device=idx.device).scatter_(2, idx[..., None], 1.0)  # [G, N, HALF]
    counts = onehot.sum(1)[..., None]  # [G, HALF, 1]
    sums = onehot.transpose(1, 2) @ target
    return torch.where(counts > 0, sums / counts.clamp_min(1), previous)
