"""What a generation is asked for and what it returns (small typed results between components)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cache import CacheStats
from ..errors import ConfigError
from .reuse import ReuseStats
from .sampling import SamplingConfig


@dataclass(frozen=True)
class LosslessConfig:
    """Lossless decoding: draft cheaply, verify against the full cache (``slimkv.speculative``).

    drafter: "self" (the compressed cache drafts), "prompt" (n-gram lookup in the prompt and the
             text so far), "rest:PATH" (a REST datastore built by ``slimkv datastore build``), or
             "auto" (a lookup draft when its match is long enough, else self-drafting;
             "auto:PATH" adds a REST datastore to the lookups)
    draft_tokens: initial self-draft length k (adapted: +1 after a fully accepted draft, -1 after a rejection)
    max_draft_tokens: longest draft (self-drafting grows up to it; lookup drafts always use it)
    full_view: where the full cache lives: "memory" (host memory) or "disk:DIR" (a file per layer, memory-mapped)
    tree_nodes: tokens of REST's draft tree, all verified in one pass (0: REST drafts one path)
    """

    drafter: str = "self"
    draft_tokens: int = 4
    max_draft_tokens: int = 8
    full_view: str = "memory"
    tree_nodes: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.draft_tokens <= self.max_draft_tokens:
            raise ConfigError(
                f"draft_tokens must be in [1, max_draft_tokens={self.max_draft_tokens}], got {self.draft_tokens}"
            )
        kind = self.drafter.split(":", 1)[0]
        if kind not in ("self", "prompt", "rest", "auto") or (kind == "rest" and ":" not in self.drafter):
            raise ConfigError(
                f"unknown drafter {self.drafter!r}; use self, prompt, rest:PATH (a datastore file), auto "
                "or auto:PATH"
            )
        if not 0 <= self.tree_nodes <= 64:
            raise ConfigError(f"tree_nodes must be in [0, 64] (0: REST drafts one path), got {self.tree_nodes}")
        if self.full_view != "memory" and not self.full_view.startswith("disk:"):
            raise ConfigError(f"full_view must be 'memory' or 'disk:DIR', got {self.full_view!r}")


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate.

    max_new_tokens: most tokens generated per sequence
    sampling: greedy (default) or seeded sampling
    stop: generation ends when the text contains any of these strings (they are cut off)
    ignore_eos: keep generating past end-of-text tokens (benchmarks that need a fixed length)
    lossless: draft with the compressed cache (or a lookup), keep only what the full cache verifies;
              None = ordinary decoding with the compressed cache
    """

    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    lossless: LosslessConfig | None = None

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
class SpecStats:
    """What lossless decoding did (vocabulary as vLLM's: drafted, accepted, plus one verifier token per pass).

    drafted: draft tokens proposed to the verifier; accepted: of those, tokens the full cache agreed with
    verify_passes: forward passes over the full cache (each emits its accepted tokens plus one of its own)
    by_drafter: per drafter name, (passes, drafted, accepted)
    draft_view_bytes: bytes of the compressed view in the fast tier at the end
    full_view_bytes, full_view_location: size and place of the full view (the slower tier)
    fallback: the full view failed and generation went on with plain full-cache decoding
    """

    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    by_drafter: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    draft_view_bytes: int = 0
    full_view_bytes: int = 0
    full_view_location: str = "memory"
    fallback: bool = False

    @property
    def mean_accepted_per_pass(self) -> float:
        return self.accepted / self.verify_passes if self.verify_passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class GenerationResult:
    """Outcome of one request.

    text: generated text (stop string removed); token_ids: generated ids
    prompt_tokens: tokens of the prompt (context + question)
    finish_reason: "eos", "stop" (a stop string) or "length"
    cache_after_prefill / cache: KV size after prompt compression and at the end
    store: what the KV store reused for this request (None without a store)
    spec: drafting and verification counts of lossless decoding (None otherwise)
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    cache_after_prefill: CacheStats
    cache: CacheStats
    timing: Timing
    store: ReuseStats | None = None
    spec: SpecStats | None = None


@dataclass(frozen=True)
class TextDelta:
    """A streamed piece of one sequence's text (``index`` is its place in the batch)."""

    index: int
    text: str
