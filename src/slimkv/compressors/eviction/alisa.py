"""ALISA: sparse window attention - a recent window plus the tokens the latest queries attended to most.

Paper: Zhao et al., "ALISA: Accelerating Large Language Model Inference via Sparsity-Aware KV Caching",
ISCA 2024, arXiv:2403.17312.

The sparse window has a locally static part, the most recent tokens, and a globally dynamic part, the
older tokens that received the most attention from the last ``queries`` queries - a sliding window of
queries, so importance follows what the model attends to *now* (H2O instead accumulates attention over
every query ever seen, which favours old tokens). The choice is redone at every step: in the decode
phase ``make_room`` evicts the entry the latest queries attended to least.

The last ``queries`` queries of each layer are kept (``[batch, q_heads, queries, head_dim]``, counted
in the layer's bytes); their attention over the kept entries is computed when scoring: ``queries`` x
entries per head, never an n x n matrix. (The paper's system side - recomputing instead of storing part
of the KV - is not modelled here; slimkv's tiered store covers storage placement.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...cache import CacheLayer, CacheSpec
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register
from ..state import QueryWindow, window_bytes
from .snapkv import window_attention


@register
@dataclass
class ALISACompressor(Compressor):
    """Recent window plus the entries most attended by the last few queries, chosen again each step.

    queries: latest queries whose attention, summed, ranks the older entries
    recent: share of the kept entries reserved for the most recent tokens (the locally static part)
    """

    queries: int = 8
    recent: float = 0.5

    name = "alisa"
    paper = ("Zhao et al., ALISA: Accelerating Large Language Model Inference via Sparsity-Aware KV Caching, "
             "ISCA 2024, arXiv:2403.17312")
    supported_phases = ("prefill", "decode")
    state_fields = ("queries",)
    # the latest queries are still the latest after a compression; without them the first decode
    # steps would evict the oldest entries, the attention sinks among them
    decode_state = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queries < 1:
            raise ConfigError(f"alisa queries must be >= 1 (the latest queries that vote), "
                              f"got {self.queries}")
        if not 0.0 <= self.recent <= 1.0:
            raise ConfigError(f"alisa recent must be a share of the budget in [0, 1], got {self.recent}")

    def observe(self, layer: CacheLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        ctx.states.setdefault(self.state_key, QueryWindow).record(query, query_positions, self.queries)

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        return window_bytes(spec, q_heads, self.queries)

    def recent_attention(self, layer: CacheLayer, window: QueryWindow) -> Tensor:
        """Attention the latest queries paid to every slot, summed over them and their group: [B, H, L]."""
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        probs, _ = window_attention(layer, keys, positions, window)  # [B, H, G, w, L]
        return probs.nan_to_num(0.0).sum(dim=(2, 3))

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        _, _, positions = layer.view()  # [B, H, L]
        window = ctx.states.get(self.state_key, QueryWindow)
        if window is not None:
            mass = self.recent_attention(layer, window)
        else:  # nothing observed yet (decode phase only, first step): prefer the newer entries
            mass = positions.float() * 1e-9
        n_recent = (ctx.keep.to(positions.device).double() * self.recent).long()  # [B]
        first_recent = ctx.seen.to(positions.device) - n_recent
        return mass.masked_fill(positions >= first_recent[:, None, None], float("inf"))
