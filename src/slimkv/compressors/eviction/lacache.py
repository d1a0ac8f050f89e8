"""LaCache: a ladder of kept tokens across layers, compacted again and again as generation goes on.

Paper: Shi et al., "LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large
Language Models", ICML 2025, arXiv:2507.14204.

Beyond the attention sinks and a recent window, older tokens are thinned out in a pattern that
differs by layer: with a stride ``s``, layer ``i`` keeps the tokens whose offset is ``i mod s`` - the
kept tokens of consecutive layers step along the sequence like the rungs of a ladder, so that all
layers together still cover every position while each holds only ``1/s`` of them. When the budget is
reached again, the already thinned region is thinned once more with stride ``s**2`` (offsets staggered
by layer the same way), then ``s**3`` ... (the paper's iterative compaction): older history gets
sparser, the cache never outgrows its budget, and generation can go on forever.

Here the ladder is a score: sinks and the recent window always stay; otherwise an entry ranks by how
many compaction levels it survives, then by recency, so ``compress`` (top-k) and ``make_room`` (evict
the minimum) both thin the oldest, least ladder-aligned tokens first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...cache import CacheLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register

#: compaction levels scored (stride s, s**2, ... s**LEVELS)
LEVELS = 8


@register
@dataclass
class LaCacheCompressor(Compressor):
    """Ladder-shaped spans across layers plus iterative compaction of older history.

    sinks: initial tokens always kept
    recent: share of the budget kept as a window of the most recent tokens
    span: consecutive layers that together cover a run of tokens (the ladder's width); the stride is
          ``1 + ceil((layers - span) / span)`` as in the paper's overlap-free ladder. None: half the layers
    """

    sinks: int = 4
    recent: float = 0.25
    span: int | None = None

    name = "lacache"
    paper = ("Shi et al., LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of LLMs, "
             "ICML 2025, arXiv:2507.14204")
    supported_phases = ("prefill", "decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ConfigError(f"lacache sinks must be >= 0, got {self.sinks}")
        if not 0.0 <= self.recent <= 1.0:
            raise ConfigError(f"lacache recent must be in [0, 1], got {self.recent}")
        if self.span is not None and self.span < 1:
            raise ConfigError(f"lacache span must be >= 1 layer, got {self.span}")

    def stride(self, num_layers: int) -> int:
        span = min(self.span or max(1, num_layers // 2), num_layers)
        return max(2, 1 + math.ceil((num_layers - span) / span))

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        _, _, positions = layer.view()  # [B, H, L]
        pos = positions.long()
        stride = self.stride(ctx.num_layers)
        offset = pos - self.sinks - ctx.layer_idx  # the layer's rung: staggered by depth
        level = torch.zeros_like(pos)
        period = 1
        for _ in range(LEVELS):
            period *= stride
            level += (offset.remainder(period) == 0).long()
        seen = ctx.seen.to(pos.device)[:, None, None]  # [B, 1, 1]
        score = level.double() * seen.double() + pos.double()  # level first, then recency
        n_recent = (ctx.keep.to(pos.device).double() * self.recent).long()[:, None, None]
        keep_always = (pos < self.sinks) | (pos >= seen - n_recent)
        return score.masked_fill(keep_always, float("inf"))
