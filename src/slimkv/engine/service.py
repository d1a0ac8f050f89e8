"""The engine on a background thread: submit from any thread or event loop, stream pieces, cancel.

Contract: :class:`EngineLoop` owns the engine's scheduler while it runs - only its thread steps it.
``submit`` tokenizes the request, checks it and binds its compressor in the caller's thread (a first
use of ``kivi2`` calibrates there, never stalling the running streams), then hands the request to the
loop, which admits it at its next step. A :class:`RequestHandle` yields the request's text pieces as
they come - iterate it in a thread, or ``async for`` it in an event loop - then its result;
``cancel`` stops the request at the next step and returns its KV to the pool. ``close`` stops taking
requests, finishes those in flight (or cancels them) and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SlimKVError
from .results import GenerationResult
from .sequence import Sequence

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)


class EngineClosed(SlimKVError):
    """The engine loop is stopping and takes no more requests."""


class QueueFull(SlimKVError):
    """As many requests wait as the loop allows (``max_queue``); try again later."""


@dataclass(frozen=True)
class Event:
    """One thing that happened to a request: a text ``piece``, its ``result``, or an ``error``."""

    piece: str = ""
    result: GenerationResult | None = None
    error: BaseException | None = None


class RequestHandle:
    """A submitted request: its text pieces as they come, its result, and :meth:`cancel`."""

    def __init__(self, loop: EngineLoop, seq: Sequence, aio: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self.seq = seq
        self._aio = aio
        self._sync: queue.Queue[Event] = queue.Queue()
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if aio is not None else None
        self.result: GenerationResult | None = None

    @property
    def id(self) -> int:
        return self.seq.id

    def cancel(self) -> None:
        """Stop the request at the loop's next step (its KV returns to the pool then)."""
        self._loop._cancel(self)

    def _deliver(self, event: Event) -> None:  # called on the loop's thread
        if self._aio is not None and self._async is not None:
            try:
                self._aio.call_soon_threadsafe(self._async.put_nowait, event)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening
                pass
        else:
            self._sync.put(event)

    def _take(self, event: Event) -> str | None:
        if event.error is not None:
            raise event.error
        if event.result is not None:
            self.result = event.result
            return None
        return event.piece

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they come (blocking); ``result`` is set when this ends."""
        if self._async is not None:
            raise RuntimeError("this request was submitted from an event loop; use `async for`")
        while self.result is None:
            piece = self._take(self._sync.get())
            if piece is not None:
                yield piece

    async def __aiter__(self) -> AsyncIterator[str]:
        """Text pieces as they come, in the event loop the request was submitted from."""
        if self._async is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it in a thread")
        while self.result is None:
            piece = self._take(await self._async.get())
            if piece is not None:
                yield piece

    def wait(self) -> GenerationResult:
        """Block until the request ends; its result (pieces not read are dropped)."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class EngineLoop:
    """Runs ``engine``'s scheduler on a background thread (see the module docstring).

    max_queue: most requests waiting for admission (submitted, not yet prefilling); more raise
               :class:`QueueFull` (None: no bound)
    """

    def __init__(self, engine: Engine, idle_wait: float = 0.05, max_queue: int | None = None) -> None:
        self.engine = engine
        self.idle_wait = idle_wait
        self.max_queue = max_queue
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}
        self._accepting = True
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="slimkv-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers (any thread)
    def submit(self, request: Any, config: Any = None, compressor: Any = None,
               events_to: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> RequestHandle:
        """Queue a request (see ``Engine.submit`` for the arguments); returns its handle.

        Called from a coroutine (or given ``events_to``, the event loop that will read it), the handle
        is read with ``async for``; otherwise by iterating it. Bad input raises here, in the caller's
        thread; so do :class:`EngineClosed` and :class:`QueueFull`.
        """
        if not self._accepting or self._stop.is_set():
            raise EngineClosed("the engine is shutting down and takes no new requests")
        if self.max_queue is not None and self.waiting() >= self.max_queue:
            raise QueueFull(f"{self.waiting()} requests are already waiting (the server allows {self.max_queue})")
        from .engine import DEFAULT

        seq = self.engine.make_sequence(request, config, DEFAULT if compressor is None else compressor, **kwargs)
        aio = events_to
        if aio is None:
            try:
                aio = asyncio.get_running_loop()
            except RuntimeError:
                aio = None
        handle = RequestHandle(self, seq, aio)
        self._inbox.put(("submit", handle))
        self._wake.set()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        self._inbox.put(("cancel", handle))
        self._wake.set()

    def waiting(self) -> int:
        """Requests submitted and not yet admitted."""
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    def stats(self) -> dict[str, int]:
        """A snapshot of the scheduler (read without locking: for metrics, not decisions)."""
        sched = self.engine.scheduler
        return {"running": len(sched.running) + (1 if sched.prefilling is not None else 0),
                "waiting": self.waiting(), "parked": len(sched.parked),
                "kv_used": sched.pool.used, "kv_budget": sched.pool.budget, "prefill_used": sched.workspace.used,
                "preemptions": sched.preemptions}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish those in flight (``drain``) or cancel them; join the thread."""
        self._accepting = False
        if not drain:
            self._inbox.put(("cancel_all", None))
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop's thread
    def _drain_inbox(self) -> None:
        sched = self.engine.scheduler
        while True:
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._handles[handle.id] = handle
                try:
                    sched.add(handle.seq)
                except Exception as exc:  # refused (e.g. larger than the pool): tell the caller
                    self._handles.pop(handle.id)
                    handle._deliver(Event(error=exc))
            elif kind == "cancel":
                sched.cancel(handle.seq)
            elif kind == "cancel_all":
                for h in self._handles.values():
                    sched.cancel(h.seq)

    def _run(self) -> None:
        sched = self.engine.scheduler
        try:
            while True:
                self._drain_inbox()
                if not sched.has_work():
                    if self._stop.is_set() and self._inbox.empty():
                        return
                    self._wake.wait(self.idle_wait)
                    self._wake.clear()
                    continue
                for seq in self.engine.step():
                    self._publish(seq)
        except BaseException as exc:  # the loop died: every waiting caller learns why
            log.exception("the engine loop failed")
            self.failure = exc
            for handle in self._handles.values():
                handle._deliver(Event(error=exc))
            self._handles.clear()
        finally:
            sched.swap.close()

    def _publish(self, seq: Sequence) -> None:
        handle = self._handles.get(seq.id)
        if handle is None:
            return
        piece = seq.piece()
        if piece:
            handle._deliver(Event(piece=piece))
        if seq.finished:
            self._handles.pop(seq.id, None)
            if seq.error is not None:
                handle._deliver(Event(error=seq.error))
            else:
                handle._deliver(Event(result=seq.result()))
