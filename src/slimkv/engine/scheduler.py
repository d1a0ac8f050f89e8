"""The scheduler: a waiting queue, the running rows, and one step of work at a time over one KV pool.

Each :meth:`Scheduler.step`, in order:

1. drops cancelled requests (their KV returns to the pool at once);
2. resumes parked requests whose KV fits again (they go before new ones);
3. admits waiting requests, first come first served, while their prefill's peak bytes fit the pool
   (a request whose KV could never fit, even alone, is refused when it is submitted);
4. advances the request being prefilled by one bounded chunk (``step_tokens`` while others decode,
   ``prefill_chunk`` when nothing does), so running streams never stall for a whole long prefill;
5. makes room for this step's decode growth: while it does not fit, the most recently admitted
   request is parked (its KV is written to the swap space and read back unchanged later);
6. decodes: one token for every plain running row in one batched forward pass (each row with its
   own cache, compressor and sampler), one draft-and-verify round for every lossless row;
7. releases finished rows (EOS, stop string, length, cancelled): their compute stops and their bytes
   return to the pool in the same step; then checks the pool against the bytes measured.

It returns the sequences that produced text or finished, whose pieces the caller streams.
"""

from __future__ import annotations

import logging
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

    kv_memory: bytes of KV the admitted requests may hold together (the pool's budget)
    max_rows: requests admitted at once (prefilling, decoding and parked together)
    prefill_chunk: prompt tokens per forward pass while nothing decodes
    step_tokens: prompt tokens prefilled per step while requests decode (bounds their stall)
    swap_dir: where parked requests' KV waits (default: a private temporary directory)
    """

    kv_memory: int
    max_rows: int = 64
    prefill_chunk: int = 4096
    step_tokens: int = 512
    swap_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_rows", "prefill_chunk", "step_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")


class Scheduler:
    """Requests from submission to their last token (see the module docstring)."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig, store: PrefixStore | None = None) -> None:
        self.runner = runner
        self.config = config
        self.store = store
        self.pool = KVPool(config.kv_memory)
        self.swap = SwapSpace(config.swap_dir)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.running: list[Sequence] = []
        self.parked: deque[Sequence] = deque()
        self._order: list[Sequence] = []  # admitted requests, oldest first (preemption takes the newest)
        self._reserved: dict[int, int] = {}  # bytes reserved ahead of work (a prefill's peak)
        self.steps = 0
        self.preemptions = 0

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a request; refused at once if its KV could not fit the pool even alone."""
        self.check(seq)
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Raise :class:`InputError` if ``seq``'s KV could not fit the pool even alone (changes nothing)."""
        need = self._alone_bytes(seq)
        if need > self.pool.budget:
            raise InputError(
                f"this request may need {need / 2**20:.1f} MiB of KV (its prompt of {seq.segments.total} tokens "
                f"uncompressed, plus {seq.budget} new tokens), more than the whole KV pool "
                f"({self.pool.budget / 2**20:.1f} MiB); raise the pool (kv_memory / --kv-memory), "
                "shorten the prompt or lower max_new_tokens"
            )

    def _alone_bytes(self, seq: Sequence) -> int:
        """Most KV bytes ``seq`` can hold running alone: its prefill's peak, then every new token uncompressed."""
        spec = self.runner.adapter.spec
        if seq.cache is not None:
            base = seq.cache.nbytes()
        else:
            base = peak_bytes(self.runner, seq.segments, seq.compressor, seq.config.lossless is not None)
        views = 2 if seq.config.lossless is not None else 1
        return base + views * spec.dense_bytes(seq.budget + 32, entry_states=2)

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq``: at the next step its compute stops and its KV returns to the pool."""
        seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.parked)

    @property
    def admitted(self) -> int:
        return len(self._order)

    def measured_bytes(self) -> int:
        """Bytes the admitted requests hold now (their caches and compressor state, measured)."""
        return sum(seq.nbytes() for seq in self._order if seq.status is not Status.PARKED)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Sequence]:
        """One step of work (see the module docstring); returns the sequences with news."""
        self.steps += 1
        touched: list[Sequence] = []
        with self.runner.adapter.attached():
            self._drop_cancelled(touched)
            self._resume()
            self._admit(touched)
            self._prefill(touched)
            self._make_room()
            self._decode(touched)
        self._release(touched)
        self._account()
        return touched

    def _drop_cancelled(self, touched: list[Sequence]) -> None:
        for seq in [*self.waiting, *self._order]:
            if seq.cancelled and not seq.finished:
                seq.finish("cancelled")
                touched.append(seq)
        self.waiting = deque(s for s in self.waiting if not s.finished)

    def _resume(self) -> None:
        while self.parked:
            seq = self.parked[0]
            if not self.pool.fits(self._reserved.get(seq.id, 0) + self._growth(seq)):
                return
            self.parked.popleft()
            self._attach(seq, self.swap.unpark(seq.id))
            seq.status = Status.PREFILLING if seq.job is not None and not seq.job.done else Status.RUNNING
            if seq.status is Status.PREFILLING:
                self.prefilling = seq
            else:
                self.running.append(seq)
            self.pool.lease(seq.id, max(self._reserved.get(seq.id, 0), seq.nbytes()))

    def _admit(self, touched: list[Sequence]) -> None:
        while self.waiting and not self.parked and self.admitted < self.config.max_rows:
            seq = self.waiting[0]
            if seq.cache is not None:  # prepared elsewhere (the evaluation runner): ready to decode
                need = seq.nbytes() * (2 if seq.config.lossless is not None else 1) + self._growth(seq)
                if not self.pool.fits(need) and self._order:
                    return
                self.waiting.popleft()
                self._order.append(seq)
                if seq.config.lossless is not None:  # the prepared cache is the full view; a compressed copy drafts
                    full, seq.cache = seq.cache, None
                    draft = full.clone()
                    self.runner.compress(draft, seq.compressor, "prefill")
                    for i in range(len(full.layers)):
                        full.retain_states(i, ())
                    self._start_lossless(seq, full, draft, question=0)
                self.pool.lease(seq.id, seq.nbytes())
                self._start_decoding(seq, touched)
                continue
            if self.prefilling is not None:
                return
            job = PrefillJob(self.runner, seq.segments, seq.compressor, self.store,
                             lossless=seq.config.lossless is not None, progress=seq.progress)
            need = job.peak_bytes()
            if not self.pool.fits(need) and self._order:
                return
            self.waiting.popleft()
            seq.job = job
            seq.status = Status.PREFILLING
            self.prefilling = seq
            self._order.append(seq)
            self._reserved[seq.id] = need
            self.pool.lease(seq.id, need)

    def _prefill(self, touched: list[Sequence]) -> None:
        seq = self.prefilling
        if seq is None:
            return
        job = seq.job
        assert job is not None
        tokens = self.config.step_tokens if self.running else self.config.prefill_chunk
        try:
            job.advance(tokens)
        except Exception as exc:  # a failing compressor fails its request only
            log.exception("prefill of request %d failed", seq.id)
            seq.error = exc
            seq.finish("error")
            touched.append(seq)
            self.prefilling = None
            return
        seq.prefill_s = job.work_s
        if not job.done:
            return
        self.prefilling = None
        self._reserved.pop(seq.id, None)
        seq.reuse = job.reuse
        if seq.config.lossless is not None:
            assert job.draft is not None
            self._start_lossless(seq, job.cache, job.draft, len(seq.segments.question))
        else:
            seq.cache = job.cache
        seq.logits = job.logits
        seq.job = None
        self.pool.lease(seq.id, seq.nbytes())
        self._start_decoding(seq, touched)

    def _start_lossless(self, seq: Sequence, full: SlimCache, draft: SlimCache, question: int) -> None:
        """Give a lossless request its decoder: ``full`` holds the whole prompt, ``draft`` its compressed
        context (the last ``question`` prompt tokens are copied into it exactly)."""
        from ..speculative.lossless import LosslessDecoder

        assert seq.config.lossless is not None
        seq.lossless = LosslessDecoder(self.runner, seq.config.lossless, seq.compressor, full, draft,
                                       [*seq.segments.context, *seq.segments.question], question, seq.budget)

    def _start_decoding(self, seq: Sequence, touched: list[Sequence]) -> None:
        cache = seq.kv_cache()
        seq.after_prefill = cache.stats() if cache is not None else None
        seq.status = Status.RUNNING
        self.running.append(seq)
        if seq.remaining <= 0:
            seq.finish("length")
            touched.append(seq)

    # ------------------------------------------------------------------ memory
    def _growth(self, seq: Sequence) -> int:
        """Bytes ``seq``'s next decode step may allocate at most."""
        if seq.lossless is not None:
            return seq.lossless.growth_bytes()
        cache = seq.cache
        if cache is None or seq.finished:
            return 0
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
            victims = [s for s in self._order if s.status in (Status.RUNNING, Status.PREFILLING) and not s.finished]
            if len(victims) <= 1:
                log.warning("KV pool: one request alone needs more than the pool; decoding on")
                return
            self._park(victims[-1])

    def _park(self, seq: Sequence) -> None:
        self._reserved[seq.id] = max(self._reserved.get(seq.id, 0), self.pool.held(seq.id))
        size = self.swap.park(seq.id, self._detach(seq))
        log.info("KV pool full: parked request %d (%.1f MiB written to swap)", seq.id, size / 2**20)
        self.pool.release(seq.id)
        if seq is self.prefilling:
            self.prefilling = None
        else:
            self.running.remove(seq)
        seq.status = Status.PARKED
        self.parked.append(seq)
        self.preemptions += 1

    @staticmethod
    def _detach(seq: Sequence) -> dict:
        """Take the sequence's KV objects out of it (to be written to the swap space)."""
        if seq.job is not None and not seq.job.done:
            state = {"cache": seq.job.cache, "draft": seq.job.draft}
            seq.job.cache, seq.job.draft = None, None  # type: ignore[assignment]
        elif seq.lossless is not None:
            state = {"draft": seq.lossless.dual.draft, "full": seq.lossless.view.detach()}
            seq.lossless.dual.draft = None  # type: ignore[assignment]
        else:
            state = {"cache": seq.cache}
            seq.cache = None
        return state

    @staticmethod
    def _attach(seq: Sequence, state: dict) -> None:
        if seq.job is not None and not seq.job.done:
            seq.job.cache, seq.job.draft = state["cache"], state["draft"]
        elif seq.lossless is not None:
            seq.lossless.dual.draft = state["draft"]
            seq.lossless.view.attach(state["full"])
        else:
            seq.cache = state["cache"]

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
        done = [s for s in self._order if s.finished]
        for seq in done:
            if seq.result_ready:
                continue
            seq.close()
            self.pool.release(seq.id)
            self._reserved.pop(seq.id, None)
            self.swap.drop(seq.id)
            if seq not in touched:
                touched.append(seq)
        if done:
            self._order = [s for s in self._order if not s.finished]
            self.running = [s for s in self.running if not s.finished]
            self.parked = deque(s for s in self.parked if not s.finished)
            if self.prefilling is not None and self.prefilling.finished:
                self.prefilling = None
        for seq in touched:  # cancelled before admission
            if seq.finished and not seq.result_ready:
                seq.close()

    def _account(self) -> None:
        measured = 0
        for seq in self._order:
            if seq.status is Status.PARKED:
                continue
            held = seq.nbytes()
            measured += held
            self.pool.lease(seq.id, max(held, self._reserved.get(seq.id, 0)))
        self.pool.check(measured)

    def close(self) -> None:
        """Cancel everything and remove the swap space."""
        for seq in [*self.waiting, *self._order]:
            seq.cancelled = True
        if self.has_work():
            self.step()
        self.swap.close()
