"""One request inside the engine: its prompt, its own settings, its cache and what it generated.

A :class:`Sequence` moves WAITING -> PREFILLING -> RUNNING -> FINISHED (RUNNING <-> PARKED when the
KV pool preempts it). Everything it needs travels with it: its compressor, sampler (seeded per
request, so its text does not depend on what runs beside it), stop strings, token budget, its cache
(or its lossless decoder's two views) and its timings. The scheduler decides when it works; the
sequence decides what a token means (:meth:`Sequence.accept`) and what it reports
(:meth:`Sequence.result`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from ..cache import CacheStats, SlimCache
from ..compressors import Compressor
from .detokenize import TextStream
from .prompts import Segments
from .results import GenerationConfig, GenerationResult, SpecStats, Timing
from .reuse import ReuseStats
from .sampling import Sampler

if TYPE_CHECKING:
    from ..speculative.lossless import LosslessDecoder
    from .prefill import PrefillJob

ProgressFn = Callable[[int, int], None]


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    PARKED = "parked"
    FINISHED = "finished"


class Sequence:
    """A request in the engine (see the module docstring).

    seq_id: the engine's id; segments: the prompt's tokens; config: what to generate
    compressor: the request's method (None: full cache); tokenizer: for its text
    end_ids: tokens that end it (unless ``config.ignore_eos``); limit: the model's context length
    prepared: an already prefilled (and compressed) cache and its last logits [1, vocab]
    progress: called with (prompt tokens done, total) while prefilling
    tenant: the store namespace of this request's reused KV (None: the engine's store as configured)
    """

    def __init__(self, seq_id: int, segments: Segments, config: GenerationConfig, compressor: Compressor | None,
                 tokenizer: object, end_ids: set[int], limit: int,
                 prepared: tuple[SlimCache, Tensor] | None = None, progress: ProgressFn | None = None,
                 tenant: str | None = None) -> None:
        self.id = seq_id
        self.tenant = tenant
        self.segments = segments
        self.config = config
        self.compressor = compressor
        self.end_ids = end_ids
        self.progress = progress
        self.budget = max(0, min(config.max_new_tokens, limit - segments.total))
        self.status = Status.WAITING
        self.cache: SlimCache | None = None
        self.logits: Tensor | None = None  # [1, vocab] logits of the next token, not sampled yet
        if prepared is not None:
            self.cache, self.logits = prepared
        self.job: PrefillJob | None = None
        self.lossless: LosslessDecoder | None = None
        self.spec: SpecStats | None = None  # what lossless decoding did, once it fell back to plain decoding
        self.sampler = Sampler(config.sampling)
        self.text = TextStream(tokenizer, config.stop)
        self.finish_reason: str | None = None
        self.cancelled = False
        self.error: Exception | None = None
        self.reuse: ReuseStats | None = None
        self.after_prefill: CacheStats | None = None
        self.prefill_s = 0.0
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.finished_at: float | None = None
        self._result: GenerationResult | None = None

    # ------------------------------------------------------------------ state
    @property
    def ids(self) -> list[int]:
        return self.text.ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.budget - len(self.ids)

    def kv_cache(self) -> SlimCache | None:
        """The cache the sequence reads (a lossless sequence's draft view)."""
        if self.lossless is not None:
            return self.lossless.draft
        if self.job is not None:
            return self.job.cache
        return self.cache

    def nbytes(self) -> int:
        """KV bytes the sequence holds now: its cache(s) and compressor state."""
        if self.lossless is not None:
            return self.lossless.nbytes()
        if self.job is not None:  # in the prefill workspace
            return self.job.cache.nbytes() + (0 if self.job.draft is None else self.job.draft.nbytes())
        return 0 if self.cache is None else self.cache.nbytes()

    def detach_kv(self) -> dict:
        """Take the sequence's KV objects out of it (to be parked in the swap space)."""
        if self.lossless is not None:
            state = {"draft": self.lossless.dual.draft, "full": self.lossless.view.detach()}
            self.lossless.dual.draft = None  # type: ignore[assignment]
        else:
            state = {"cache": self.cache}
            self.cache = None
        return state

    def attach_kv(self, state: dict) -> None:
        """Take back what :meth:`detach_kv` handed out."""
        if self.lossless is not None:
            self.lossless.dual.draft = state["draft"]
            self.lossless.view.attach(state["full"])
        else:
            self.cache = state["cache"]

    # ------------------------------------------------------------------ tokens
    def accept(self, token: int) -> None:
        """Take one generated token: an end token, a stop string or the budget may end the sequence."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        if token in self.end_ids and not self.config.ignore_eos:
            self.finish("eos")
            return
        self.text.add(token)
        if self.text.stopped:
            self.finish("stop")
        elif self.remaining <= 0:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finished_at = time.perf_counter()
            self.text.finish()

    def piece(self) -> str:
        """Text ready to stream ("" if none)."""
        return self.text.piece()

    # ------------------------------------------------------------------ report
    @property
    def result_ready(self) -> bool:
        return self._result is not None

    def close(self) -> None:
        """Record the result and free the sequence's KV (called when it finished)."""
        if self._result is not None:
            return
        self._result = self.result()
        if self.lossless is not None:
            self.lossless.close()
        self.cache, self.job, self.lossless, self.logits = None, None, None, None

    def result(self) -> GenerationResult:
        if self._result is not None:
            return self._result
        cache = self.kv_cache()
        stats = cache.stats() if cache is not None else CacheStats(self.segments.total, 0, 0, 0)
        generated = len(self.ids)
        decode_s = (self.last_token - self.first_token) if self.first_token and self.last_token else 0.0
        start = self.first_token if self.first_token is not None else (self.finished_at or time.perf_counter())
        spec = self.lossless.stats(stats.bytes_kept) if self.lossless is not None else self.spec
        return GenerationResult(
            text=self.text.text, token_ids=list(self.ids), prompt_tokens=self.segments.total,
            finish_reason=self.finish_reason or "length",
            cache_after_prefill=self.after_prefill or stats, cache=stats,
            timing=Timing(prefill_s=self.prefill_s, ttft_s=start - self.submitted,
                          decode_tokens_per_s=(generated - 1) / decode_s if decode_s > 0 and generated > 1 else 0.0),
            store=self.reuse, spec=spec,
        )
