"""Random eviction: the floor every method must beat.

Paper: used as a baseline in Devoto et al., arXiv:2406.11430 and in NVIDIA kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...cache import KVLayer
from ..base import Compressor, ScoreContext
from ..registry import register


@register
@dataclass
class RandomCompressor(Compressor):
    """Keep a uniformly random subset of entries (seeded, deterministic).

    seed: seed of the random scores; the same seed gives the same choices
    """

    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    name = "random"
    paper = "baseline (kvpress; Devoto et al., arXiv:2406.11430)"
    supported_phases = ("prefill", "decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._generator = torch.Generator().manual_seed(int(self.seed))

    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:
        _, _, positions = layer.view()
        return torch.rand(positions.shape, generator=self._generator).to(positions.device)
