"""TriAttention: keep the keys that future queries are expected to attend to, predicted from RoPE geometry.

Paper: "Efficient Long Reasoning with Trigonometric KV Compression" (TriAttention, 2026), arXiv:2604.04921
(the arXiv id as cited by public implementations of the method).

Before RoPE, the queries of a head cluster around a fixed, non-zero centre ``c`` (measured once per model
on real text, ``compressors/calibration.py``). Write a head's vectors as complex rotary pairs
``z_f = x[f] + i x[f + D/2]``; RoPE turns pair f by ``w_f * position``. A query near the centre at
position ``p`` then meets a stored key (post-RoPE, as our cache holds it, ``k_f``) with the logit

    sum_f  s * Re(c_f * exp(i w_f p) * conj(k_f))  =  sum_f s |c_f| |k_f| cos(w_f (p - p_k) + phase_f)

(``s``: the model's RoPE scaling): a trigonometric series in the distance ``p - p_k``. A key's score is
that expected logit averaged over future query positions ``p = now + d`` for a geometric set of
distances ``d = 1, 2, 4, ... max_distance``, plus the paper's norm term
``sum_f s (E|q_f| - |c_f|) |k_f|``: the part of the queries' spread the centre does not capture, which
favours keys of large norm. The average over ``d`` folds into one effective query per head,
``c_f exp(i w_f now) mean_d exp(i w_f d)``, so scoring costs one dot product per key and query head.
The query heads of a GQA group keep a key if any of them expects it (maximum over the group).

The rotation of a stored key is folded into the phase through the position it was rotated at, so keys
never need un-rotating. Strongest in the decode phase (``make_room`` evicts the lowest expected logit
each step); a recent window (a share ``recent`` of the kept entries) is always kept, so that new tokens
are not evicted at once. On the embedded model a wide window works best: streaming perplexity at budget
128 (``benchmarks/triattention_window.py``) was 16.26 with a 16-token window and 16.02 with 64
(StreamingLLM 16.20, full cache 15.27).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ...cache import CacheLayer
from ...errors import ConfigError
from ..base import Compressor, ModelAccess, ScoreContext
from ..registry import register

log = logging.getLogger(__name__)


def distances(max_distance: int) -> Tensor:
    """Future query distances averaged over: 1, 2, 4, ... up to ``max_distance`` ([n] float64)."""
    out, d = [], 1
    while d <= max_distance:
        out.append(float(d))
        d *= 2
    return torch.tensor(out, dtype=torch.float64)


def expected_logits(keys: Tensor, centre: Tensor, abs_mean: Tensor, inv_freq: Tensor, scaling: float,
                    now: Tensor, ahead: Tensor) -> Tensor:
    """Expected logit of every key for every query head, averaged over future distances.

    keys:     [B, H, L, D] post-RoPE keys (rotate-half layout)
    centre:   [Hq, D/2] complex, mean pre-RoPE query of each query head; abs_mean: [Hq, D/2] ``E|q_f|``
    inv_freq: [D/2] RoPE frequencies; scaling: RoPE's cos/sin factor
    now:      [B] position the future distances count from; ahead: [n] distances
    Returns [B, Hq, L] float32: trigonometric term plus norm term (the softmax scale left out).
    """
    batch, heads, length, dim = keys.shape
    q_heads, half = centre.shape
    groups = q_heads // heads
    freq = inv_freq.double().to(keys.device)
    angle = ahead.to(keys.device)[:, None] * freq  # [n, D/2]
    spread = torch.polar(torch.ones_like(angle), angle).mean(0)  # mean_d exp(i w_f d)
    here = now.double().to(keys.device)[:, None] * freq  # [B, D/2]
    turn = torch.polar(torch.ones_like(here), here) * spread  # [B, D/2]
    query = scaling * centre.to(keys.device, torch.complex128)[None] * turn[:, None]  # [B, Hq, D/2]
    query = torch.cat([query.real, query.imag], dim=-1).float()  # real layout: Re(q conj k) = q . k
    k = keys.float()
    trig = torch.einsum("bhld,bhgd->bhgl", k, query.view(batch, heads, groups, dim))
    modulus = torch.hypot(k[..., :half], k[..., half:])  # [B, H, L, D/2]
    weight = scaling * (abs_mean.float() - centre.abs().float()).clamp(min=0).to(keys.device)  # [Hq, D/2]
    norm = torch.einsum("bhlf,hgf->bhgl", modulus, weight.view(heads, groups, half))
    return (trig + norm).reshape(batch, q_heads, length)


@dataclass(frozen=True)
class Centres:
    """What TriAttention needs of a model (``bind``): calibrated query centres and RoPE frequencies."""

    centre: Tensor  # [layers, Hq, D/2] complex64
    abs_mean: Tensor  # [layers, Hq, D/2] float32
    inv_freq: list[Tensor]  # per layer, [D/2]
    scaling: list[float]


@register
@dataclass
class TriAttentionCompressor(Compressor):
    """Expected future logit from calibrated pre-RoPE query centres (a trigonometric series in distance).

    recent: share of the kept entries reserved for the most recent tokens (always kept)
    max_distance: farthest future query distance averaged over (geometric: 1, 2, 4, ... max_distance)
    """

    recent: float = 0.5
    max_distance: int = 4096

    name = "triattention"
    paper = ("TriAttention: Efficient Long Reasoning with Trigonometric KV Compression (2026), "
             "arXiv:2604.04921")
    supported_phases = ("prefill", "decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ConfigError(f"triattention recent must be a share of the kept entries in [0, 1], "
                              f"got {self.recent}")
        if self.max_distance < 1:
            raise ConfigError(f"triattention max_distance must be >= 1 token, got {self.max_distance}")
        self._ahead = distances(self.max_distance)

    def bind(self, model: ModelAccess) -> Centres | None:
        """Load (or measure once) the model's query centres and read its RoPE frequencies."""
        if not self.compresses:
            return None
        from ..calibration import ensure_centres

        adapter = model.adapter
        centres = ensure_centres(model)
        ropes = [adapter.rope(i) for i in range(adapter.spec.layers)]
        return Centres(centres.mean, centres.abs_mean, [r.inv_freq for r in ropes], [r.scaling for r in ropes])

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        if not isinstance(ctx.bound, Centres):
            raise ConfigError(
                "triattention needs the model's query centres: run it through an Engine (which binds it), "
                "or pass compressor.bind(model) as ScoreContext.bound"
            )
        b, i = ctx.bound, ctx.layer_idx
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        seen = ctx.seen.to(positions.device)
        logits = expected_logits(keys, b.centre[i], b.abs_mean[i], b.inv_freq[i], b.scaling[i],
                                 seen - 1, self._ahead)  # [B, Hq, L]
        batch, heads, length = positions.shape
        score = logits.view(batch, heads, -1, length).amax(dim=2)  # a key any head of the group expects
        n_recent = (ctx.keep.to(positions.device).double() * self.recent).long()  # [B]
        recent = positions >= (seen - n_recent)[:, None, None]
        return score.masked_fill(recent, float("inf"))
