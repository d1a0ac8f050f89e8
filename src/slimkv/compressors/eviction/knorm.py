"""Knorm: keep the keys with the smallest L2 norm.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
arXiv:2406.11430 (a baseline in NVIDIA kvpress).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...cache import CacheLayer
from ..base import Compressor, ScoreContext
from ..registry import register


@register
@dataclass
class KnormCompressor(Compressor):
    """Keep keys with the smallest L2 norm (low-norm keys draw the most attention)."""

    name = "knorm"
    paper = "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, arXiv:2406.11430"
    supported_phases = ("prefill", "decode")

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        keys, _, _ = layer.view()  # [B, H, L, D]
        return -keys.float().norm(dim=-1)
