"""Prefill, decode steps, sampling and the generation loop over slimkv's cache."""

from .generate import Engine
from .loop import Generation
from .results import GenerationConfig, GenerationResult, TextDelta, Timing
from .prompts import Request, Segments
from .sampling import Sampler, SamplingConfig

__all__ = [
    "Engine", "Generation", "GenerationConfig", "GenerationResult", "Request", "Sampler",
    "SamplingConfig", "Segments", "TextDelta", "Timing",
]
