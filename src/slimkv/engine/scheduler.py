"""The scheduler: a waiting queue, the running rows, and one step of work at a time over one KV pool.

Memory has two parts, each a byte budget checked after every step:

- the **KV pool** (``kv_memory``) holds what decoding requests hold: their caches after their
  compressor, and their growth. A request enters it when its KV *after compression* fits;
- the **prefill workspace** (``prefill_memory``) holds the one request being prefilled: a method
  like SnapKV must see the whole prompt before it can compress it, so the uncompressed prompt
  (and, for a lossless request, its compressed copy) lives there until it moves into the pool.

Each :meth:`Scheduler.step`, in order:

1. drops cancelled requests (their KV is freed at once);
2. resumes parked requests whose KV fits the pool again (they go before new ones);
3. moves the prefilled request from the workspace into the pool when its compressed KV fits;
4. admits waiting requests: a prepared cache straight into the pool, otherwise the first waiting
   request into the workspace (first come, first served; one at a time);
5. advances that prefill by one bounded chunk (``step_tokens`` while others decode,
   ``prefill_chunk`` when nothing does), so running streams never stall for a whole long prompt;
6. makes room for this step's decode growth: while it does not fit the pool, the most recently
   admitted request is parked (its KV is written to the swap space and read back unchanged later);
7. decodes: one token for every plain running row in one batched forward pass (each row with its
   own cache, compressor and sampler), one draft-and-verify round for every lossless row;
8. releases finished rows (EOS, stop string, length, cancelled): their compute stops and their bytes
   return in the same step; then checks both budgets against the bytes measured.

It returns the sequences that produced text or finished, whose pieces the caller streams.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from ..cache import SlimCache
from ..errors import InputError
from .forward import keep_table
from .pool import KVPool, SwapSpace
from .prefill import PrefillJob, peak_bytes
from .reuse import PrefixStore
from .runner import ModelRunner
from .sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler shares the machine between requests.

    kv_memory: bytes the decoding requests' KV may hold together (the pool)
    prefill_memory: bytes the request being prefilled may hold (its uncompressed prompt)
    max_rows: requests admitted at once (prefilling, decoding and parked together)
    prefill_chunk: prompt tokens per forward pass while nothing decodes
    step_tokens: prompt tokens prefilled per step while requests decode (bounds their stall)
    swap_dir: where parked requests' KV waits (default: a private temporary directory)
    """

    kv_memory: int
    prefill_memory: int
    max_rows: int = 64
    prefill_chunk: int = 4096
    step_tokens: int = 512
    swap_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_rows", "prefill_chunk", "step_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SchedulerStats:
    """Where the scheduler's time went (seconds) and how much it did, since it started.

    steps: steps taken; prefill_s: prefill chunks; decode_s: decode passes and lossless rounds;
    park_s: writing and reading parked requests; decoded: rows decoded, summed over steps
    (``decoded / steps`` is the mean batch); preemptions: requests parked
    """

    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    park_s: float = 0.0
    decoded: int = 0
    preemptions: int = 0


class Scheduler:
    """Requests from submission to their last token (see the module docstring)."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig, store: PrefixStore | None = None) -> None:
        self.runner = runner
        self.config = config
        self.store = store
        self.pool = KVPool(config.kv_memory)
        self.workspace = KVPool(config.prefill_memory)
        self.swap = SwapSpace(config.swap_dir)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None  # in the workspace: being prefilled, or waiting for the pool
        self.running: list[Sequence] = []
        self.parked: deque[Sequence] = deque()
        self._pooled: list[Sequence] = []  # requests in the pool (running or parked), oldest first
        self._parked_bytes: dict[int, int] = {}  # what a parked request held
        self.stats = SchedulerStats()

    @property
    def preemptions(self) -> int:
        return self.stats.preemptions

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a request; refused at once if it could never run (see :meth:`check`)."""
        self.check(seq)
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Raise :class:`InputError` if ``seq`` could never run, even alone (changes nothing)."""
        mib = 2**20
        if seq.cache is not None:
            held = seq.cache.nbytes()
        else:
            need = peak_bytes(self.runner, seq.segments, seq.compressor, seq.config.lossless is not None)
            if need > self.workspace.budget:
                raise InputError(
                    f"prefilling this prompt of {seq.segments.total} tokens needs {need / mib:.1f} MiB, more "
                    f"than the prefill workspace ({self.workspace.budget / mib:.1f} MiB); raise prefill_memory "
                    "(--prefill-memory) or shorten the prompt"
                )
            # a compressor's size is known after the prefill (checked then); without one it is the prompt's
            compresses = seq.compressor is not None and seq.compressor.compresses
            held = 0 if compresses else self.runner.adapter.spec.dense_bytes(seq.segments.total)
        if self._alone_bytes(seq, held) > self.pool.budget:
            raise InputError(self._too_big(seq, self._alone_bytes(seq, held)))

    def _alone_bytes(self, seq: Sequence, held: int) -> int:
        """Most KV bytes ``seq`` holds decoding alone: what it holds now, then every new token uncompressed."""
        views = 2 if seq.config.lossless is not None else 1
        return held + views * self.runner.adapter.spec.dense_bytes(seq.budget + 32, entry_states=2)

    def _too_big(self, seq: Sequence, need: int) -> str:
        mib = 2**20
        return (f"this request needs up to {need / mib:.1f} MiB of KV while decoding ({seq.segments.total} prompt "
                f"tokens after its compressor, plus {seq.budget} new tokens), more than the whole KV pool "
                f"({self.pool.budget / mib:.1f} MiB); raise kv_memory (--kv-memory), use a smaller compressor "
                "ratio, or lower max_new_tokens")

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq``: at the next step its compute stops and its KV is freed."""
        seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.parked)

    @property
    def admitted(self) -> int:
        return len(self._pooled) + (self.prefilling is not None)

    def measured_bytes(self) -> int:
        """Bytes the requests in the pool hold now (their caches and compressor state, measured)."""
        return sum(seq.nbytes() for seq in self.running)

    def workspace_bytes(self) -> int:
        """Bytes the request in the prefill workspace holds now."""
        return 0 if self.prefilling is None else self.prefilling.nbytes()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Sequence]:
        """One step of work (see the module docstring); returns the sequences with news."""
        stats = self.stats
        stats.steps += 1
        touched: list[Sequence] = []
        with self.runner.adapter.attached():
            self._drop_cancelled(touched)
            t0 = time.perf_counter()
            self._resume()
            t1 = time.perf_counter()
            self._join(touched)
            self._admit(touched)
            self._prefill(touched)
            self._join(touched)
            t2 = time.perf_counter()
            self._make_room()
            t3 = time.perf_counter()
            self._decode(touched)
            t4 = time.perf_counter()
        stats.park_s += (t1 - t0) + (t3 - t2)
        stats.prefill_s += t2 - t1
        stats.decode_s += t4 - t3
        self._release(touched)
        self._account()
        return touched

    def _drop_cancelled(self, touched: list[Sequence]) -> None:
        for seq in [*self.waiting, *self._pooled, *([self.prefilling] if self.prefilling else [])]:
            if seq.cancelled and not seq.finished:
                seq.finish("cancelled")
                touched.append(seq)
        self.waiting = deque(s for s in self.waiting if not s.finished)

    def _resume(self) -> None:
        while self.parked:
            seq = self.parked[0]
            if not self.pool.fits(self._parked_bytes[seq.id] + self._growth(seq)):
                return
            self.parked.popleft()
            seq.attach_kv(self.swap.unpark(seq.id))
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.pool.lease(seq.id, self._parked_bytes.pop(seq.id))

    def _admit(self, touched: list[Sequence]) -> None:
        while self.waiting and not self.parked and self.admitted < self.config.max_rows:
            seq = self.waiting[0]
            if seq.cache is not None:  # prepared elsewhere (the evaluation runner): ready to decode
                views = 2 if seq.config.lossless is not None else 1
                if not self.pool.fits(seq.nbytes() * views + self._growth(seq)) and self.running:
                    return
                self.waiting.popleft()
                if seq.config.lossless is not None:  # the prepared cache is the full view; a compressed copy drafts
                    full, seq.cache = seq.cache, None
                    draft = full.clone()
                    self.runner.compress(draft, seq.compressor, "prefill")
                    for i in range(len(full.layers)):
                        full.retain_states(i, ())
                    self._start_lossless(seq, full, draft, question=0)
                self._enter_pool(seq, touched)
                continue
            if self.prefilling is not None:
                return
            store = self.store
            if store is not None and seq.tenant is not None:
                store = store.for_tenant(seq.tenant)
            job = PrefillJob(self.runner, seq.segments, seq.compressor, store,
                             lossless=seq.config.lossless is not None, progress=seq.progress)
            self.waiting.popleft()
            seq.job = job
            seq.status = Status.PREFILLING
            self.prefilling = seq
            self.workspace.lease(seq.id, job.peak_bytes())

    def _prefill(self, touched: list[Sequence]) -> None:
        seq = self.prefilling
        if seq is None or seq.job is None or seq.job.done:
            return
        tokens = self.config.step_tokens if self.running else self.config.prefill_chunk
        try:
            seq.job.advance(tokens)
        except Exception as exc:  # a failing compressor fails its request only
            log.exception("prefill of request %d failed", seq.id)
            self._fail(seq, exc, touched)
            return
        seq.prefill_s = seq.job.work_s
        self.workspace.check(seq.job.held_peak)  # the whole prompt before compression, measured

    def _join(self, touched: list[Sequence]) -> None:
        """Move the prefilled request from the workspace into the pool once its compressed KV fits."""
        seq = self.prefilling
        if seq is None or seq.job is None or not seq.job.done:
            return
        job = seq.job
        held = job.cache.nbytes() + (0 if job.draft is None else job.draft.nbytes())
        if self._alone_bytes(seq, held) > self.pool.budget:
            self._fail(seq, InputError(self._too_big(seq, self._alone_bytes(seq, held))), touched)
            return
        if not self.pool.fits(held + self._growth_of(job.cache, seq)) and self.running:
            return  # waits in the workspace until decoding requests free the pool
        self.prefilling = None
        self.workspace.release(seq.id)
        seq.reuse = job.reuse
        if seq.config.lossless is not None:
            assert job.draft is not None
            self._start_lossless(seq, job.cache, job.draft, len(seq.segments.question))
        else:
            seq.cache = job.cache
        seq.logits = job.logits
        seq.job = None
        self._enter_pool(seq, touched)

    def _fail(self, seq: Sequence, exc: Exception, touched: list[Sequence]) -> None:
        seq.error = exc
        seq.finish("error")
        touched.append(seq)
        if seq is self.prefilling:
            self.prefilling = None
            self.workspace.release(seq.id)

    def _start_lossless(self, seq: Sequence, full: SlimCache, draft: SlimCache, question: int) -> None:
        """Give a lossless request its decoder: ``full`` holds the whole prompt, ``draft`` its compressed
        context (the last ``question`` prompt tokens are copied into it exactly)."""
        from ..speculative.lossless import LosslessDecoder

        assert seq.config.lossless is not None
        seq.lossless = LosslessDecoder(self.runner, seq.config.lossless, seq.compressor, full, draft,
                                       [*seq.segments.context, *seq.segments.question], question, seq.budget)

    def _enter_pool(self, seq: Sequence, touched: list[Sequence]) -> None:
        cache = seq.kv_cache()
        seq.after_prefill = cache.stats() if cache is not None else None
        seq.status = Status.RUNNING
        self.running.append(seq)
        self._pooled.append(seq)
        self.pool.lease(seq.id, seq.nbytes())
        if seq.remaining <= 0:
            seq.finish("length")
            touched.append(seq)

    # ------------------------------------------------------------------ memory
    def _growth(self, seq: Sequence) -> int:
        """Bytes ``seq``'s next decode step may allocate at most."""
        if seq.lossless is not None:
            return seq.lossless.growth_bytes()
        return 0 if seq.cache is None or seq.finished else self._growth_of(seq.cache, seq)

    def _growth_of(self, cache: SlimCache, seq: Sequence) -> int:
        comp = seq.compressor
        caps = None
        if comp is not None and comp.active("decode"):
            caps = keep_table(comp, cache.seen + 1, len(cache.layers))
        return cache.growth_bytes(1, caps)

    def _make_room(self) -> None:
        """Park the newest requests until every running row's next token fits the pool."""
        while True:
            need = sum(self._growth(seq) for seq in self.running)
            if self.pool.fits(need):
                return
            victims = [s for s in self._pooled if s.status is Status.RUNNING and not s.finished]
            if len(victims) <= 1:
                log.warning("KV pool: one request alone needs more than the pool; decoding on")
                return
            self._park(victims[-1])

    def _park(self, seq: Sequence) -> None:
        self._parked_bytes[seq.id] = self.pool.held(seq.id)
        size = self.swap.park(seq.id, seq.detach_kv())
        log.info("KV pool full: parked request %d (%.1f MiB written to swap)", seq.id, size / 2**20)
        self.pool.release(seq.id)
        self.running.remove(seq)
        seq.status = Status.PARKED
        self.parked.append(seq)
        self.stats.preemptions += 1

    # ------------------------------------------------------------------ decoding
    def _decode(self, touched: list[Sequence]) -> None:
        rows, batch = [], []
        for seq in self.running:
            if seq.finished:
                continue
            if seq.lossless is not None:
                self._lossless_round(seq, touched)
                continue
            token = int(seq.sampler(seq.logits)[0])  # type: ignore[arg-type]
            seq.accept(token)
            touched.append(seq)
            if not seq.finished:
                assert seq.cache is not None
                rows.append(self.runner.row(seq.cache, [token], seq.compressor, "decode"))
                batch.append(seq)
        self.stats.decoded += len(rows)
        if rows:
            logits = self.runner.forward(rows)[:, -1]  # [B, vocab]
            for i, seq in enumerate(batch):
                seq.logits = logits[i : i + 1]

    def _lossless_round(self, seq: Sequence, touched: list[Sequence]) -> None:
        from ..speculative.lossless import Fallback

        decoder = seq.lossless
        assert decoder is not None
        try:
            tokens = decoder.step(seq.logits, seq.sampler, seq.remaining)
        except Fallback as fb:
            seq.spec = decoder.stats(decoder.draft.nbytes())
            decoder.close()
            seq.lossless, seq.cache, seq.logits = None, fb.cache, fb.logits
            return
        seq.logits = None
        touched.append(seq)
        for token in tokens:
            seq.accept(token)
            if seq.finished:
                break
            decoder.emitted(token)

    # ------------------------------------------------------------------ bookkeeping
    def _release(self, touched: list[Sequence]) -> None:
        for seq in [*self._pooled, *touched]:
            if seq.finished and not seq.result_ready:
                seq.close()
                self.pool.release(seq.id)
                self.swap.drop(seq.id)
                self._parked_bytes.pop(seq.id, None)
                if seq not in touched:
                    touched.append(seq)
        if self.prefilling is not None and self.prefilling.finished:
            self.workspace.release(self.prefilling.id)
            self.prefilling = None
        self._pooled = [s for s in self._pooled if not s.finished]
        self.running = [s for s in self.running if not s.finished]
        self.parked = deque(s for s in self.parked if not s.finished)

    def _account(self) -> None:
        measured = 0
        for seq in self.running:
            held = seq.nbytes()
            measured += held
            self.pool.lease(seq.id, held)
        self.pool.check(measured)
        if self.prefilling is not None:
            held = self.prefilling.nbytes()
            self.workspace.lease(self.prefilling.id, max(held, self.workspace.held(self.prefilling.id)))
            self.workspace.check(held)

    def close(self) -> None:
        """Cancel everything and remove the swap space."""
        for seq in [*self.waiting, *self._pooled, *([self.prefilling] if self.prefilling else [])]:
            seq.cancelled = True
        if self.has_work():
            self.step()
        self.swap.close()
