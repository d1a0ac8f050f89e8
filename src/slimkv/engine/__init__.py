"""The engine: a model runner, a scheduler over one KV pool, and the clients built on them."""

from .engine import Engine
from .generation import Generation
from .prompts import Request, Segments
from .results import GenerationConfig, GenerationResult, LosslessConfig, SpecStats, TextDelta, Timing
from .sampling import Sampler, SamplingConfig
from .sequence import Sequence

__all__ = [
    "Engine", "Generation", "GenerationConfig", "GenerationResult", "LosslessConfig", "Request", "Sampler",
    "SamplingConfig", "Segments", "Sequence", "SpecStats", "TextDelta", "Timing",
]
