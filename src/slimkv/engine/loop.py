"""The decode loop of one generation: sampling, stop strings, streaming pieces, batched rows.

:class:`Generation` is what ``Engine.stream`` returns: iterating it prefills every request (unless
given prepared caches), stacks them into one batch and decodes one token per step for every row until
each row ends (EOS, a stop string, ``max_new_tokens`` or the model's context), yielding text pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..cache import CacheStats, SlimCache
from .forward import ForwardContext
from .prompts import Request, Segments, tokenize
from .results import GenerationConfig, GenerationResult, TextDelta, Timing
from .reuse import ReuseStats
from .sampling import Sampler

if TYPE_CHECKING:
    from .engine import Engine

ProgressFn = Callable[[int, int], None]


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
                ctx = ForwardContext(cache, positions, engine.compressor, phase="decode",
                                     punctuation=engine.punctuation(tokens[:, None]))
                next_logits = engine.adapter.forward(tokens[:, None], positions, ctx)[:, -1]
                cache.seen = [n + 1 for n in cache.seen]
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
