"""The engine: a model, default settings and a KV store, in front of the scheduler.

:class:`Engine` is the Python API. Requests are submitted with their own settings (compressor,
sampling, stop strings, ``max_new_tokens``, lossless) and run together: the scheduler
(``engine/scheduler.py``) prefills them one at a time in bounded chunks in a prefill workspace, admits
them into one KV pool once their compressed KV fits, and decodes every running request in one batched
forward pass per step. The calling styles are clients of that
one core:

- :meth:`Engine.generate` / :meth:`Engine.generate_batch` / :meth:`Engine.stream` step the
  scheduler in the caller's thread until their requests finish;
- :meth:`Engine.serve` starts a background loop (``engine/service.py``) for concurrent callers:
  submit from any thread or event loop, receive text pieces as they come, cancel.

Lower-level pieces for tools that drive compression themselves (the evaluation runner, fidelity,
calibration): :meth:`new_cache`, :meth:`prefill`, :meth:`compress`, :meth:`prepare`.
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import TYPE_CHECKING, Any

import torch

from ..cache import SlimCache
from ..compressors import Compressor
from ..errors import ConfigError, InputError
from ..models.adapter import ModelAdapter
from .generation import Generation, ProgressFn
from .pool import default_budget
from .prefill import PrefillJob
from .prompts import Request, Segments, end_token_ids, tokenize
from .results import GenerationConfig, GenerationResult
from .reuse import PrefixStore
from .runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence

if TYPE_CHECKING:
    from .service import EngineLoop

log = logging.getLogger(__name__)

#: ``compressor`` argument meaning "the engine's default compressor"
DEFAULT: Any = object()


class Engine:
    """Runs a causal LM with slimkv's cache (see the module docstring).

    model, tokenizer: a Hugging Face causal LM and its tokenizer (``slimkv.load_model``)
    compressor: the default method of requests that name none (None = full cache)
    prefill_chunk: prompt tokens per forward pass when a prompt is prefilled alone
    store: reuse stored KV of prompt prefixes and compressed contexts (``engine/reuse.py``)
    kv_memory: bytes of KV the decoding requests may hold together, after their compressors (default: a
               share of the memory available now, ``engine/pool.py``)
    prefill_memory: bytes the request being prefilled may hold (its uncompressed prompt; default: twice
               the longest prompt the model takes, enough for a lossless request's two views)
    max_rows: requests admitted at once
    step_tokens: prompt tokens prefilled per step while other requests decode
    swap_dir: where preempted requests' KV waits (default: a temporary directory)
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, compressor: Compressor | None = None,
                 prefill_chunk: int = 4096, store: PrefixStore | None = None, kv_memory: int | None = None,
                 prefill_memory: int | None = None, max_rows: int = 64, step_tokens: int = 512,
                 swap_dir: str | None = None) -> None:
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.adapter = ModelAdapter(model)
        self.tokenizer = tokenizer
        self.compressor = compressor
        self.end_ids = end_token_ids(tokenizer, model)
        self.runner = ModelRunner(self.adapter, tokenizer, prefill_chunk)
        budget = kv_memory if kv_memory is not None else default_budget(self.adapter.device)
        if prefill_memory is None:
            prefill_memory = 2 * self.adapter.spec.dense_bytes(self.adapter.max_positions, entry_states=2)
        self.scheduler = Scheduler(self.runner, SchedulerConfig(budget, prefill_memory, max_rows, prefill_chunk,
                                                                step_tokens, swap_dir), store)
        self._ids = itertools.count()

    # ------------------------------------------------------------------ settings
    @property
    def store(self) -> PrefixStore | None:
        return self.scheduler.store

    @store.setter
    def store(self, store: PrefixStore | None) -> None:
        self.scheduler.store = store

    @property
    def prefill_chunk(self) -> int:
        return self.runner.prefill_chunk

    def use_store(self, stack: Any, tenant: str = "default", chunk_size: int = 256,
                  shared_namespace: str | None = None) -> PrefixStore:
        """Reuse KV through a :class:`~slimkv.store.TierStack` (keys scoped to ``tenant``)."""
        from ..store import KeySpec

        spec = KeySpec(tenant=tenant, model=self.adapter.fingerprint(), dtype=str(self.adapter.spec.dtype),
                       chunk_size=chunk_size, shared_namespace=shared_namespace)
        self.store = PrefixStore(stack, spec)
        return self.store

    def with_compressor(self, compressor: Compressor | None) -> Engine:
        """The same engine (model, scheduler, store) with another default compressor."""
        clone = copy.copy(self)
        clone.compressor = compressor
        return clone

    def bind(self, compressor: Compressor | None) -> Any:
        """Bind ``compressor`` to this model now (calibrations it needs run once, here); returns its data.

        Submitting a request binds its compressor too; call this to pay for calibrations up front.
        """
        return None if compressor is None else self.runner.bindings.bind(compressor)

    # ------------------------------------------------------------------ building blocks
    def new_cache(self) -> SlimCache:
        return self.runner.new_cache()

    def prefill(self, cache: SlimCache, ids: list[int], progress: ProgressFn | None = None,
                observers: tuple[Compressor, ...] | None = None) -> torch.Tensor:
        """Feed ``ids`` to ``cache`` in chunks (no compression: see :meth:`compress`).

        observers: methods recording what they need while prefilling (default: the engine's
                   compressor); pass several to let one prefill serve several methods.
        Returns the logits of the last token, [1, vocab].
        """
        observers = observers if observers is not None else ((self.compressor,) if self.compressor else ())
        for o in observers:
            self.runner.bindings.bind(o)
        return self.runner.prefill(cache, ids, observers, progress)

    def compress(self, cache: SlimCache, phase: str = "prefill") -> None:
        """Shrink ``cache`` to the engine's compressor's target for the tokens seen so far."""
        if self.compressor is not None:
            self.runner.bindings.bind(self.compressor)
        self.runner.compress(cache, self.compressor, phase)  # type: ignore[arg-type]

    def prepare(self, segments: Segments, progress: ProgressFn | None = None) -> tuple[SlimCache, torch.Tensor]:
        """Prefill and compress one prompt now (as a request would be); its cache and last logits [1, vocab]."""
        self.check_length(segments)
        if self.compressor is not None:
            self.runner.bindings.bind(self.compressor)
        job = PrefillJob(self.runner, segments, self.compressor, self.store, progress=progress)
        job.run()
        assert job.logits is not None
        return job.cache, job.logits

    def check_length(self, segments: Segments) -> None:
        limit = self.adapter.max_positions
        if segments.total == 0:
            raise InputError("the prompt is empty; give some text to generate from")
        if segments.total >= limit:
            raise InputError(
                f"the prompt has {segments.total} tokens but the model's context is {limit} tokens; "
                "shorten the prompt (or the context file) so that it fits with room for the answer"
            )

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request | Segments | str, config: GenerationConfig | None = None,
               compressor: Compressor | None = DEFAULT, prepared: tuple[SlimCache, torch.Tensor] | None = None,
               progress: ProgressFn | None = None, tenant: str | None = None) -> Sequence:
        """Queue one request with its own settings; the scheduler runs it (see :meth:`step`).

        compressor: this request's method (default: the engine's); prepared: an already prefilled
        (and compressed) cache of ``request`` and its last logits, to decode from; tenant: the store
        namespace its reused KV lives in (default: the store's own)
        Binding the compressor (its calibrations, once per model) happens here, before it queues.
        """
        seq = self.make_sequence(request, config, compressor, prepared, progress, tenant)
        self.scheduler.add(seq)
        return seq

    def make_sequence(self, request: Request | Segments | str, config: GenerationConfig | None = None,
                      compressor: Compressor | None = DEFAULT,
                      prepared: tuple[SlimCache, torch.Tensor] | None = None,
                      progress: ProgressFn | None = None, tenant: str | None = None) -> Sequence:
        """A checked, bound request ready to queue (what :meth:`submit` and the engine loop queue)."""
        config = config or GenerationConfig()
        comp = self.compressor if compressor is DEFAULT else compressor
        segments = self._segments(request)
        self.check_length(segments)
        if config.lossless is not None:
            if self.store is not None:
                raise ConfigError("lossless decoding does not reuse stored KV yet; use an engine without a store")
        if comp is not None:
            self.runner.bindings.bind(comp)
        if tenant is not None:
            from ..store.keys import check_namespace

            check_namespace(tenant)
        seq = Sequence(next(self._ids), segments, config, comp, self.tokenizer, self.end_ids,
                       self.adapter.max_positions, prepared, progress, tenant)
        self.scheduler.check(seq)
        return seq

    def _segments(self, request: Request | Segments | str) -> Segments:
        if isinstance(request, Segments):
            return request
        req = Request(context=request) if isinstance(request, str) else request
        return tokenize(self.tokenizer, req)

    def step(self) -> list[Sequence]:
        """One scheduler step (see ``engine/scheduler.py``); returns the sequences with news."""
        return self.scheduler.step()

    def stream(self, requests: list[Request | Segments] | Request | Segments | str,
               config: GenerationConfig | None = None, progress: ProgressFn | None = None,
               compressor: Compressor | None = DEFAULT) -> Generation:
        """Start generating; iterate the result for :class:`TextDelta` pieces, then read ``.results``.

        A request is text (:class:`Request`, or a plain string: a raw prompt) or already tokenized
        (:class:`Segments`). All requests share ``config`` and ``compressor`` here; submit them one
        by one (:meth:`submit`) for settings of their own.
        """
        reqs = [requests] if isinstance(requests, (Request, Segments, str)) else list(requests)
        if not reqs:
            raise InputError("no request to generate for")
        seqs = [self.submit(r, config, compressor, progress=progress) for r in reqs]
        return Generation(self, seqs)

    def continue_from(self, cache: SlimCache, logits: torch.Tensor, segments: Segments,
                      config: GenerationConfig | None = None) -> GenerationResult:
        """Decode from an already prefilled (and compressed) cache of ``segments``.

        logits: [1, vocab] of the prompt's last token. A compressor acting while decoding is the
        engine's (``with_compressor``). With ``config.lossless``, ``cache`` must be the *uncompressed*
        prefill (observed by the compressor): it becomes the full view, and a compressed copy the draft view.
        """
        seq = self.submit(segments, config, prepared=(cache, logits))
        gen = Generation(self, [seq])
        for _ in gen:
            pass
        return gen.results[0]

    def generate(self, request: Request | Segments | str, config: GenerationConfig | None = None,
                 progress: ProgressFn | None = None, compressor: Compressor | None = DEFAULT) -> GenerationResult:
        """Generate for one request (a plain string is a raw prompt)."""
        gen = self.stream(request, config, progress, compressor)
        for _ in gen:
            pass
        return gen.results[0]

    def generate_batch(self, requests: list[Request | Segments], config: GenerationConfig | None = None,
                       compressor: Compressor | None = DEFAULT) -> list[GenerationResult]:
        """Generate for several requests decoded together."""
        gen = self.stream(requests, config, compressor=compressor)
        for _ in gen:
            pass
        return gen.results

    def serve(self) -> EngineLoop:
        """Run the scheduler on a background thread for concurrent callers (``engine/service.py``)."""
        from .service import EngineLoop

        return EngineLoop(self)
