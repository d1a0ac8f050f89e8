"""A request's prompt going into its cache, a bounded number of tokens at a time.

The scheduler advances a :class:`PrefillJob` by at most a few hundred tokens per step while other
requests decode, so a long prompt never stalls their streams. In order (the store's steps only
when the engine has one, see ``engine/reuse.py``):

1. question-agnostic with a compressor: a stored compressed context skips steps 2-3;
2. stored leading chunks of the context are loaded; the rest is prefilled in chunks while the
   compressor observes it;
3. the new uncompressed chunks are stored; the context is compressed (prefill phase) and the
   compressed context stored;
4. the question is prefilled in chunks (observed too), then a compressor acting while decoding
   trims the cache to its budget.

Lossless requests (``speculative/``) keep the uncompressed cache as their full view: step 3
compresses a copy into the draft view, and step 4 prefills the question over the full view and
copies its exact KV into the draft view.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from ..cache import SlimCache
from ..compressors import Compressor
from .prompts import Segments
from .reuse import PrefixStore, ReuseStats
from .runner import ModelRunner

ProgressFn = Callable[[int, int], None]


def peak_bytes(runner: ModelRunner, segments: Segments, compressor: Compressor | None, lossless: bool) -> int:
    """Most bytes a request's prefill holds at once: its uncompressed prompt, its compressor's state, and
    for a lossless request the compressed copy beside it (the KV pool reserves this on admission)."""
    spec = runner.adapter.spec
    state = 0 if compressor is None else compressor.state_bytes(spec, runner.adapter.q_heads, segments.total)
    return spec.dense_bytes(segments.total) * (2 if lossless else 1) + state


class PrefillJob:
    """The prefill of one request (see the module docstring).

    runner: the model; segments: the prompt; compressor: the request's method (None: full cache)
    store: the engine's prefix store, or None; lossless: keep the full cache beside a compressed draft
    progress: called with (prompt tokens done, total) after every chunk
    """

    def __init__(self, runner: ModelRunner, segments: Segments, compressor: Compressor | None,
                 store: PrefixStore | None = None, lossless: bool = False,
                 progress: ProgressFn | None = None) -> None:
        self.runner = runner
        self.segments = segments
        self.compressor = compressor
        self.store = store if not lossless else None
        self.lossless = lossless
        self.progress = progress
        self.cache: SlimCache = runner.new_cache()
        self.draft: SlimCache | None = None  # lossless: the compressed view
        self.logits: Tensor | None = None
        self.reuse: ReuseStats | None = ReuseStats() if self.store is not None else None
        self.work_s = 0.0  # seconds spent in this request's prefill
        self.held_peak = 0  # most bytes its caches held (measured before compression)
        self.done = False
        self._started = False
        self._context = 0  # context tokens in the cache
        self._question = 0
        self._compressed = False
        self._loaded = 0  # context tokens loaded from the store
        self._reserved: set[str] = set()
        comp = compressor
        self._compresses = comp is not None and (comp.active("prefill") or comp.active("decode"))

    def peak_bytes(self) -> int:
        """Most bytes this prefill's caches hold at once (see :func:`peak_bytes`)."""
        return peak_bytes(self.runner, self.segments, self.compressor, self.lossless)

    # ------------------------------------------------------------------ work
    def advance(self, max_tokens: int) -> int:
        """Prefill up to ``max_tokens`` more prompt tokens; returns how many were processed."""
        t0 = time.perf_counter()
        if not self._started:
            self._start()
        done = 0
        context, question = self.segments.context, self.segments.question
        while not self.done and done < max_tokens:
            if self._context < len(context):
                done += self._chunk(self.cache, context, "_context", max_tokens - done, self.compressor)
            elif not self._compressed:
                self._finish_context()
            elif self._question < len(question):  # observed too; over the full view only, for lossless
                observers = () if self.lossless else None
                done += self._chunk(self.cache, question, "_question", max_tokens - done, self.compressor,
                                    observers)
            else:
                self._finish_question()
        self.work_s += time.perf_counter() - t0
        return done

    def run(self) -> None:
        """Prefill the whole prompt now."""
        while not self.done:
            self.advance(self.runner.prefill_chunk)

    def _chunk(self, cache: SlimCache, ids: list[int], cursor: str, room: int, compressor: Compressor | None,
               observers: tuple[Compressor, ...] | None = None) -> int:
        start = getattr(self, cursor)
        if cursor not in self._reserved:  # the segment's room, exactly, before its first chunk
            cache.reserve(len(ids) - start)
            self._reserved.add(cursor)
        n = min(room, self.runner.prefill_chunk, len(ids) - start)
        chunk = ids[start : start + n]
        logits = self.runner.forward([self.runner.row(cache, chunk, compressor, "prefill", observers)])
        self.logits = logits[:, -1]
        setattr(self, cursor, start + n)
        if self.progress is not None:
            done = self._context + self._question
            self.progress(done, self.segments.total)
        return n

    def _start(self) -> None:
        self._started = True
        store, comp, segments = self.store, self.compressor, self.segments
        if store is None:
            return
        assert self.reuse is not None
        if self._compresses and segments.question:
            assert comp is not None
            loaded = store.load_compressed(self.runner.adapter.spec, segments.context, comp, self.reuse)
            if loaded is not None:  # compress once, query many: no prefill, no compression
                self.cache = loaded
                self._context = len(segments.context)
                self._compressed = True
                return
        self._context = store.load_prefix(self.cache, segments.context, self.reuse, whole=bool(segments.question))
        self._loaded = self._context

    def _finish_context(self) -> None:
        """Store the new uncompressed chunks, then compress (a copy, for lossless) and store that."""
        self._compressed = True
        self.held_peak = max(self.held_peak, self.cache.nbytes())
        store, comp, segments = self.store, self.compressor, self.segments
        if store is not None:
            assert self.reuse is not None
            loaded = self._loaded
            miss = len(segments.context) - loaded
            self.reuse.miss_tokens += miss
            if miss and self.work_s > 0:
                self.reuse.saved_s = self.work_s / miss * self.reuse.hit_tokens
            store.save_prefix(self.cache, segments.context, loaded, whole=bool(segments.question))
        if self.lossless:
            self.draft = self.cache.clone()
            if self._compresses:
                self.runner.compress(self.draft, comp, "prefill")
            for i in range(len(self.cache.layers)):  # the full view keeps keys and values only
                self.cache.retain_states(i, ())
            return
        if self._compresses:
            self.runner.compress(self.cache, comp, "prefill")
            if store is not None and segments.question:
                assert comp is not None
                store.save_compressed(self.cache, segments.context, comp)

    def _finish_question(self) -> None:
        self.done = True
        self.held_peak = max(self.held_peak, self.cache.nbytes() + (0 if self.draft is None else self.draft.nbytes()))
        comp = self.compressor
        if self.segments.question and self.reuse is not None:
            self.reuse.miss_tokens += len(self.segments.question)
        if self.segments.question and not self.lossless and comp is not None and comp.active("decode"):
            self.runner.compress(self.cache, comp, "decode")
