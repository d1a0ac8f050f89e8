"""The generation loop: chunked prefill, compression, decode steps, streaming, batches.

Order of work for a request (see ``prompts.Request``):

1. prefill the context in chunks of ``prefill_chunk`` tokens into a fresh :class:`SlimCache`;
2. compress it (prefill phase: question-agnostic when a question follows);
3. prefill the question, if any (compressed again only in the decode phase, to keep the budget);
4. decode one token per step for every sequence of the batch, evicting as the decode phase asks,
   until EOS, a stop string, ``max_new_tokens`` or the model's context length.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..cache import CacheStats, SlimCache
from ..compressors import Compressor
from ..errors import ConfigError, InputError
from ..models.adapter import ModelAdapter
from .forward import ForwardContext
from .prompts import Request, Segments, end_token_ids, tokenize
from .reuse import PrefixStore, ReuseStats
from .sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


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


@dataclass
class _Row:
    """Decoding state of one sequence (``prepared``: its cache and last logits, if already prefilled)."""

    segments: Segments
    prepared: tuple[SlimCache, torch.Tensor] | None = None
    store: ReuseStats | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters already streamed
    finish: str | None = None


class Engine:
    """Runs a causal LM with slimkv's cache and a compressor.

    model, tokenizer: a Hugging Face causal LM and its tokenizer (``slimkv.load_model``)
    compressor: the method applied to every request (None = full cache)
    prefill_chunk: prompt tokens per forward pass while prefilling
    store: reuse stored KV of prompt prefixes and compressed contexts (``engine/reuse.py``)
    """

    def __init__(self, model, tokenizer, compressor: Compressor | None = None, prefill_chunk: int = 1024,
                 store: PrefixStore | None = None) -> None:
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.store = store
        self.adapter = ModelAdapter(model)
        self.tokenizer = tokenizer
        self.compressor = compressor
        self.prefill_chunk = prefill_chunk
        self.end_ids = end_token_ids(tokenizer, model)

    def use_store(self, stack, tenant: str = "default", chunk_size: int = 256,
                  shared_namespace: str | None = None) -> PrefixStore:
        """Reuse KV through a :class:`~slimkv.store.TierStack` (keys scoped to ``tenant``)."""
        from ..store import KeySpec

        spec = KeySpec(tenant=tenant, model=self.adapter.fingerprint(), dtype=str(self.adapter.spec.dtype),
                       chunk_size=chunk_size, shared_namespace=shared_namespace)
        self.store = PrefixStore(stack, spec)
        return self.store

    def with_compressor(self, compressor: Compressor | None) -> Engine:
        """The same model and settings with another compressor (cheap: nothing is reloaded)."""
        clone = copy.copy(self)
        clone.compressor = compressor
        return clone

    # ------------------------------------------------------------------ prefill
    def new_cache(self, batch: int = 1) -> SlimCache:
        return SlimCache(self.adapter.spec, batch)

    def prefill(self, cache: SlimCache, ids: list[int], progress: ProgressFn | None = None,
                done: int = 0, total: int | None = None,
                observers: tuple[Compressor, ...] | None = None) -> torch.Tensor:
        """Feed ``ids`` to a one-sequence cache in chunks (no compression: see :meth:`compress`).

        observers: methods recording what they need while prefilling (default: the engine's
                   compressor); pass several to let one prefill serve several methods.
        Returns the logits of the last token, [1, vocab].
        """
        if cache.batch != 1:
            raise ValueError("prefill works on one sequence at a time")
        total = total if total is not None else len(ids)
        device = self.adapter.device
        for layer in cache.layers:
            layer.reserve(layer.max_length + len(ids))
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            first = cache.seen[0]
            positions = torch.arange(first, first + len(chunk), device=device)[None]
            ctx = ForwardContext(cache, positions, self.compressor, phase="prefill", observers=observers)
            logits = self.adapter.forward(torch.tensor([chunk], device=device), positions, ctx)
            cache.seen[0] += len(chunk)
            if progress is not None:
                progress(done + start + len(chunk), total)
        assert logits is not None
        return logits[:, -1]

    def prepare(self, segments: Segments, progress: ProgressFn | None = None) -> tuple[SlimCache, torch.Tensor]:
        """Prefill and compress one request's prompt; returns its cache and last-token logits.

        With a store (``self.store``), stored KV replaces recomputation where it can (see
        ``engine/reuse.py``); ``self.store.stats`` then tells what was reused.
        """
        self.check_length(segments)
        comp = self.compressor
        compress = comp is not None and (comp.active("prefill") or comp.active("decode"))
        store = self.store
        if store is not None:
            store.begin()
        cache = None
        if store is not None and compress and segments.question:
            assert comp is not None
            cache = store.load_compressed(self.adapter.spec, segments.context, comp)
        logits = None
        if cache is None:
            cache = self.new_cache()
            whole = bool(segments.question)
            start = store.load_prefix(cache, segments.context, whole) if store is not None else 0
            t0 = time.perf_counter()
            if start < len(segments.context):
                logits = self.prefill(cache, segments.context[start:], progress=progress, done=start,
                                      total=segments.total)
            if store is not None:
                miss = len(segments.context) - start
                store.stats.miss_tokens += miss
                if miss:
                    store.stats.saved_s = (time.perf_counter() - t0) / miss * store.stats.hit_tokens
                store.save_prefix(cache, segments.context, start, whole)
            if compress:
                self.compress(cache, "prefill")
                if store is not None and segments.question:
                    assert comp is not None
                    store.save_compressed(cache, segments.context, comp)
        if segments.question:
            logits = self.prefill(cache, segments.question, progress=progress,
                                  done=len(segments.context), total=segments.total)
            if store is not None:
                store.stats.miss_tokens += len(segments.question)
            if comp is not None and comp.active("decode"):
                self.compress(cache, "decode")
        assert logits is not None
        return cache, logits

    def compress(self, cache: SlimCache, phase: str) -> None:
        """Shrink every layer of ``cache`` to the compressor's target for the tokens seen so far."""
        ForwardContext(cache, torch.empty(1, 0), self.compressor, phase=phase).compress()

    def check_length(self, segments: Segments) -> None:
        limit = self.adapter.max_positions
        if segments.total == 0:
            raise InputError("the prompt is empty; give some text to generate from")
        if segments.total >= limit:
            raise InputError(
                f"the prompt has {segments.total} tokens but the model's context is {limit} tokens; "
                "shorten the prompt (or the context file) so that it fits with room for the answer"
            )

    # ------------------------------------------------------------------ generation
    def stream(self, requests: list[Request | Segments] | Request | Segments,
               config: GenerationConfig | None = None, progress: ProgressFn | None = None) -> Generation:
        """Start generating; iterate the result for :class:`TextDelta` pieces, then read ``.results``.

        A request is text (:class:`Request`) or already tokenized (:class:`Segments`).
        """
        reqs = [requests] if isinstance(requests, (Request, Segments)) else list(requests)
        if not reqs:
            raise InputError("no request to generate for")
        return Generation(self, reqs, config or GenerationConfig(), progress)

    def continue_from(self, cache: SlimCache, logits: torch.Tensor, segments: Segments,
                      config: GenerationConfig | None = None) -> GenerationResult:
        """Decode from an already prefilled (and compressed) one-sequence cache.

        logits: [1, vocab] of the prompt's last token; segments: the prompt it holds (for counts).
        """
        gen = Generation(self, [segments], config or GenerationConfig(), None, prepared=[(cache, logits)])
        for _ in gen:
            pass
        return gen.results[0]

    def generate(self, request: Request | Segments | str, config: GenerationConfig | None = None,
                 progress: ProgressFn | None = None) -> GenerationResult:
        """Generate for one request (a plain string is a raw prompt)."""
        req = Request(context=request) if isinstance(request, str) else request
        gen = self.stream(req, config, progress)
        for _ in gen:
            pass
        return gen.results[0]

    def generate_batch(self, requests: list[Request | Segments], config: GenerationConfig | None = None) -> list[GenerationResult]:
        """Generate for several requests decoded together in one batch."""
        gen = self.stream(requests, config)
        for _ in gen:
            pass
        return gen.results


class Generation:
    """An in-progress generation: iterate for text pieces; ``results`` holds the outcome afterwards."""

    def __init__(self, engine: Engine, requests: list[Request | Segments], config: GenerationConfig,
                 progress: ProgressFn | None,
                 prepared: list[tuple[SlimCache, torch.Tensor]] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.rows = [_Row(r if isinstance(r, Segments) else tokenize(engine.tokenizer, r)) for r in requests]
        for row, ready in zip(self.rows, prepared or []):
            row.prepared = ready
        for row in self.rows:
            engine.check_length(row.segments)
        self.progress = progress
        self.results: list[GenerationResult] = []

    def __iter__(self) -> Iterator[TextDelta]:
        engine, cfg = self.engine, self.config
        sampler = Sampler(cfg.sampling)
        with engine.adapter.attached():
            t0 = time.perf_counter()
            caches, logits = [], []
            for row in self.rows:
                if row.prepared is None:
                    row.prepared = engine.prepare(row.segments, self.progress)
                    row.store = engine.store.stats if engine.store is not None else None
                cache, last = row.prepared
                caches.append(cache)
                logits.append(last)
            cache = caches[0] if len(caches) == 1 else SlimCache.stack(caches)
            after_prefill = [c.stats() for c in caches]
            prefill_s = time.perf_counter() - t0
            next_logits = torch.cat(logits, dim=0)  # [B, vocab]
            limit = engine.adapter.max_positions
            budget = [min(cfg.max_new_tokens, limit - r.segments.total) for r in self.rows]
            ttft = t_first = None
            steps = 0
            while True:
                active = [i for i, r in enumerate(self.rows) if r.finish is None]
                for i in active:
                    if len(self.rows[i].ids) >= budget[i]:
                        self.rows[i].finish = "length"
                if all(r.finish is not None for r in self.rows):
                    break
                tokens = sampler(next_logits)  # [B]
                if ttft is None:
                    ttft = time.perf_counter() - t0
                    t_first = time.perf_counter()
                for i, row in enumerate(self.rows):
                    if row.finish is None:
                        yield from self._accept(i, row, int(tokens[i]))
                if all(r.finish is not None for r in self.rows):
                    break
                positions = torch.tensor(cache.seen, device=engine.adapter.device)[:, None]
                ctx = ForwardContext(cache, positions, engine.compressor, phase="decode")
                next_logits = engine.adapter.forward(tokens[:, None], positions, ctx)[:, -1]
                cache.seen = [n + 1 for n in cache.seen]
                steps += 1
            decode_s = time.perf_counter() - t_first if t_first is not None else 0.0
            final = cache.stats() if len(caches) == 1 else None
        for i, row in enumerate(self.rows):
            yield from self._flush(i, row)
            generated = len(row.ids)
            tps = (generated - 1) / decode_s if decode_s > 0 and generated > 1 else 0.0
            stats = final if final is not None else _row_stats(cache, i)
            self.results.append(GenerationResult(
                text=row.text, token_ids=row.ids, prompt_tokens=row.segments.total,
                finish_reason=row.finish or "length", cache_after_prefill=after_prefill[i], cache=stats,
                timing=Timing(prefill_s=prefill_s, ttft_s=ttft if ttft is not None else prefill_s,
                              decode_tokens_per_s=tps),
                store=row.store,
            ))

    def _accept(self, index: int, row: _Row, token: int) -> Iterator[TextDelta]:
        engine, stops = self.engine, self.config.stop
        if token in engine.end_ids and not self.config.ignore_eos:
            row.finish = "eos"
            return
        row.ids.append(token)
        row.text = engine.tokenizer.decode(row.ids, skip_special_tokens=True)
        for s in stops:
            cut = row.text.find(s)
            if cut >= 0:
                row.text, row.finish = row.text[:cut], "stop"
        if row.finish is None:
            # hold back what could still become a stop string or an incomplete character
            hold = max((len(s) - 1 for s in stops), default=0)
            safe = len(row.text) - hold
            while safe > row.emitted and row.text[safe - 1] == "\ufffd":
                safe -= 1
            if safe > row.emitted:
                yield TextDelta(index, row.text[row.emitted : safe])
                row.emitted = safe

    def _flush(self, index: int, row: _Row) -> Iterator[TextDelta]:
        if len(row.text) > row.emitted:
            yield TextDelta(index, row.text[row.emitted :])
            row.emitted = len(row.text)


def _row_stats(cache: SlimCache, index: int) -> CacheStats:
    """Stats of one sequence of a batched cache (its share of free slots included)."""
    total = cache.stats()
    spec = cache.spec
    kept = sum(int(layer.lengths[index].sum()) for layer in cache.layers if layer.lengths is not None)
    share = 1 / cache.batch
    return CacheStats(
        tokens_full=cache.seen[index],
        tokens_kept=round(kept / (spec.layers * spec.kv_heads)),
        bytes_full=cache.seen[index] * spec.bytes_per_token,
        bytes_kept=round(total.bytes_kept * share),
    )
