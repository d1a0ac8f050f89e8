"""Prefill, decode steps, sampling and the generation loop over slimkv's cache."""

from .engine import Engine
from .loop import Generation
from .results import GenerationConfig, GenerationResult, LosslessConfig, SpecStats, TextDelta, Timing
from .prompts import Request, Segments
from .sampling import Sampler, SamplingConfig

__all__ = [
    "Engine", "Generation", "GenerationConfig", "GenerationResult", "LosslessConfig", "Request", "Sampler",
    "SamplingConfig", "Segments", "SpecStats", "TextDelta", "Timing",
]
