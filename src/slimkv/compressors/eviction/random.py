"""Random eviction: the floor every method must beat.

Paper: used as a baseline in Devoto et al., arXiv:2406.11430 and in NVIDIA kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...cache import CacheLayer
from ..base import Compressor, ScoreContext
from ..registry import register
from ..state import RandomStream


@register
@dataclass
class RandomCompressor(Compressor):
    """Keep a uniformly random subset of entries (seeded, deterministic).

    seed: seed of the random scores; the same seed gives the same choices
    """

    seed: int = 0

    name = "random"
    paper = "baseline (kvpress; Devoto et al., arXiv:2406.11430)"
    supported_phases = ("prefill", "decode")
    state_fields = ("seed",)
    decode_state = True  # each request and layer draws from its own stream

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        _, _, positions = layer.view()
        stream = ctx.states.setdefault(self.state_key,
                                       lambda: RandomStream.seeded(int(self.seed) + 7919 * ctx.layer_idx))
        return stream.rand(positions.shape).to(positions.device)
