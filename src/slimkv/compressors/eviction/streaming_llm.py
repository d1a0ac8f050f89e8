"""StreamingLLM: keep a few initial "attention sink" tokens and a window of the most recent ones.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...cache import CacheLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register


@register
@dataclass
class StreamingLLMCompressor(Compressor):
    """Attention sinks (the first tokens) plus the most recent tokens.

    sinks: number of initial tokens always kept
    """

    sinks: int = 4

    name = "streaming_llm"
    paper = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, arXiv:2309.17453"
    supported_phases = ("prefill", "decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        _, _, positions = layer.view()  # [B, H, L]
        score = positions.float()  # newer is better ...
        return score.masked_fill(positions < self.sinks, float("inf"))  # ... and sinks always stay
