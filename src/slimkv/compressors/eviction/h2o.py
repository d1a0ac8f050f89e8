"""H2O: heavy hitters (keys with the most accumulated attention) plus a window of recent tokens.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", arXiv:2306.14048.

Each entry's attention mass is accumulated over every query that has seen it: while prefilling,
``EXPLICIT_ROWS`` query rows at a time (never a full n x n matrix), and one query per step while
decoding. In the decode phase the entry with the lowest accumulated mass outside the recent window
is evicted at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...cache import KVLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register

STATE = "h2o"


@register
@dataclass
class H2OCompressor(Compressor):
    """Heavy hitters by accumulated attention plus a recent window.

    recent: share of the kept entries reserved for the most recent tokens (the paper splits evenly)
    """

    recent: float = 0.5

    name = "h2o"
    paper = "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, arXiv:2306.14048"
    supported_phases = ("prefill", "decode")
    needs_key_mass = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ConfigError(f"h2o recent must be in [0, 1], got {self.recent}")

    def observe(self, layer: KVLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        assert key_mass is not None
        state = layer.new_slot_state(STATE)
        state[:, :, : key_mass.shape[-1]] += key_mass

    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:
        _, _, positions = layer.view()  # [B, H, L]
        length = positions.shape[-1]
        state = layer.slot_state.get(STATE)
        mass = state[:, :, :length] if state is not None else torch.zeros(positions.shape)
        n_recent = (ctx.keep.to(positions.device).double() * self.recent).long()  # [B]
        first_recent = ctx.seen.to(positions.device) - n_recent  # [B]
        recent = positions >= first_recent[:, None, None]
        return mass.masked_fill(recent, float("inf"))
