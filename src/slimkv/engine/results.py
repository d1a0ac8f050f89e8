"""What a generation is asked for and what it returns (small typed results between components)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cache import CacheStats
from ..errors import ConfigError
from .reuse import ReuseStats
from .sampling import SamplingConfig


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate.

    max_new_tokens: most tokens generated per sequence
    sampling: greedy (default) or seeded sampling
    stop: generation ends when the text contains any of these strings (they are cut off)
    ignore_eos: keep generating past end-of-text tokens (benchmarks that need a fixed length)
    """

    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one generation (a batch shares them).

    prefill_s: prefill and compression; ttft_s: until the first generated token;
    decode_tokens_per_s: generated tokens after the first, per second of decoding (per sequence)
    """

    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class GenerationResult:
    """Outcome of one request.

    text: generated text (stop string removed); token_ids: generated ids
    prompt_tokens: tokens of the prompt (context + question)
    finish_reason: "eos", "stop" (a stop string) or "length"
    cache_after_prefill / cache: KV size after prompt compression and at the end
    store: what the KV store reused for this request (None without a store)
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    cache_after_prefill: CacheStats
    cache: CacheStats
    timing: Timing
    store: ReuseStats | None = None


@dataclass(frozen=True)
class TextDelta:
    """A streamed piece of one sequence's text (``index`` is its place in the batch)."""

    index: int
    text: str
