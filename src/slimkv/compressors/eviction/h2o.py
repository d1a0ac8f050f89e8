"""H2O: heavy hitters (keys with the most accumulated attention) plus a window of recent tokens.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", arXiv:2306.14048.

Each entry's attention mass is accumulated over the queries that have seen it, one query per step
while decoding. In the decode phase the entry with the lowest accumulated mass outside the recent
window is evicted at each step.

While prefilling, the mass of every prompt query over every key is the full n x n attention matrix,
which fused attention kernels never materialise. ``query_stride=1`` computes it exactly (the layer's
attention then runs an explicit pass, ``EXPLICIT_ROWS`` query rows at a time): at 4k tokens that
doubled the prefill time on CPU (1.87x ``none``; attention is most of a 4k prefill of a small model).
The default ``query_stride=16`` lets the attention run fused and estimates the mass from the last
query of every run of 16 (each weighing for its 16): an entry's accumulated mass is a sum over the
many queries after it, which a regular sample of them estimates well, and the heavy hitters, whose
mass is largest, best of all. The last query of a pass is always sampled, so a one-token decode step
is exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...cache import CacheLayer, CacheSpec
from ...cache.attention import visible_width
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register
from .snapkv import query_attention

SAMPLED_ROWS = 32  # sampled queries scored at once (a [G x 32, L] block per KV head)


@register
@dataclass
class H2OCompressor(Compressor):
    """Heavy hitters by accumulated attention plus a recent window.

    recent: share of the kept entries reserved for the most recent tokens (the paper splits evenly)
    query_stride: while prefilling, estimate the attention mass from one query in this many (1: every
                  query, exact, at the cost of an explicit attention pass)
    """

    recent: float = 0.5
    query_stride: int = 16

    name = "h2o"
    paper = "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, arXiv:2306.14048"
    supported_phases = ("prefill", "decode")
    state_fields = ("query_stride",)
    decode_state = True  # the mass accumulated over the prompt keeps growing while decoding

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ConfigError(f"h2o recent must be in [0, 1], got {self.recent}")
        if isinstance(self.query_stride, bool) or int(self.query_stride) != self.query_stride \
                or self.query_stride < 1:
            raise ConfigError(f"h2o query_stride must be a whole number >= 1, got {self.query_stride}")

    @property
    def needs_key_mass(self) -> bool:  # exact mass comes from the attention pass itself
        return self.query_stride == 1

    def observe(self, layer: CacheLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        if key_mass is None:
            key_mass = sampled_mass(layer, query, query_positions, int(self.query_stride))
        state = layer.entry_state(self.state_key)
        state[:, :, : key_mass.shape[-1]] += key_mass

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        return spec.layers * spec.kv_heads * tokens * 4  # a float32 mass per entry

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        _, _, positions = layer.view()  # [B, H, L]
        length = positions.shape[-1]
        state = layer.get_entry_state(self.state_key)
        mass = state[:, :, :length] if state is not None else torch.zeros(positions.shape, device=positions.device)
        n_recent = (ctx.keep.to(positions.device).double() * self.recent).long()  # [B]
        first_recent = ctx.seen.to(positions.device) - n_recent  # [B]
        recent = positions >= first_recent[:, None, None]
        return mass.masked_fill(recent, float("inf"))


def sampled_mass(layer: CacheLayer, query: Tensor, query_positions: Tensor, stride: int) -> Tensor:
    """Attention mass per slot [B, H, L] estimated from one query in ``stride`` of this pass.

    query: [B, Hq, T, D] (RoPE applied); query_positions: [B, T]. The last query of every run of
    ``stride`` (counting back from the pass's last token) stands for its run: its probabilities are
    weighted by the run's length. Summed over the query heads of each KV head, as the exact mass is.
    """
    keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
    tokens = query.shape[2]
    picked = torch.arange(tokens - 1, -1, -stride, device=query.device).flip(0)  # [S]
    weight = torch.diff(picked, prepend=picked.new_tensor([-1])).float()  # run lengths [S]
    q, qpos = query[:, :, picked], query_positions[:, picked]  # [B, Hq, S, D], [B, S]
    valid = None if layer.uniform else layer.valid_mask()
    mass = torch.zeros(positions.shape, dtype=torch.float32, device=keys.device)
    for start in range(0, picked.shape[0], SAMPLED_ROWS):
        rows = slice(start, start + SAMPLED_ROWS)
        qp = qpos[:, rows]  # [B, s]
        width = positions.shape[-1]
        if tokens > 1:  # a prompt's early queries see only its first slots: skip the slots none can see
            seen = positions <= qp.max()
            width = visible_width(seen if valid is None else seen & valid, width)
        probs = query_attention(q[:, :, rows], qp, keys[:, :, :width], positions[..., :width], layer.scale,
                                None if valid is None else valid[..., :width])  # [B, H, G, s, w]
        mass[..., :width] += torch.einsum("bhgsl,s->bhl", probs, weight[rows])
    return mass
