"""Tiers stacked fastest first: reads walk down and promote, writes go through the top tier.

Contract (the engine is the caller; all methods are thread-safe):

* ``get(key)`` asks each tier in order and returns the first hit; the hit is copied into the top tier
  at once and into the other tiers above it by the write-behind thread. ``match_prefix(keys)`` counts
  the leading chained keys the stack holds (how much of a prompt can be reused).
* ``put(key, blob)`` stores into the top tier synchronously and queues the write for every lower tier
  (write-behind). The queue is bounded: when it is full the lower-tier write is dropped and counted,
  never blocking the caller. ``flush()`` waits until every queued write is done.
* ``get_chunk``/``put_chunk`` and ``get_cache``/``put_cache`` do the same with the codec applied; a
  blob that fails to decode is deleted from every tier, logged and reported as a miss.
* ``close()`` drains the queue, stops the thread and closes the tiers; the stack is a context manager.

Tiers already turn their own failures (corrupt entry, unreachable server) into misses; the stack adds
no retries. Namespaces are passed through untouched, so isolation is the tiers' (see ``tiers/base.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self, TypeVar

from .codec import CachePayload, ChunkKV, decode_cache, decode_chunk, encode_cache, encode_chunk
from .errors import CorruptChunk
from .keys import ChunkKey
from .tiers.base import Tier, TierStats

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StackStats:
    """One namespace's view of every tier (top first) and the write-behind queue of this process."""

    tiers: tuple[TierStats, ...]
    pending_writes: int
    dropped_writes: int


class TierStack:
    """Tiers fastest first, e.g. ``TierStack([MemoryTier(), DiskTier(path), RedisTier(url)])``.

    queue_size: most blobs waiting for the write-behind thread (each holds its bytes in memory)
    """

    def __init__(self, tiers: Sequence[Tier], queue_size: int = 256) -> None:
        if not tiers:
            raise ValueError("TierStack needs at least one tier")
        if queue_size <= 0:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.tiers = list(tiers)
        self.queue_size = queue_size
        self._queue: deque[tuple[ChunkKey, bytes, tuple[Tier, ...]]] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._dropped = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        if len(self.tiers) > 1:
            self._thread = threading.Thread(target=self._drain, name="slimkv-store-write-behind", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ write-behind
    def _enqueue(self, key: ChunkKey, blob: bytes, tiers: Sequence[Tier]) -> None:
        if not tiers:
            return
        with self._cond:
            if self._closed or len(self._queue) >= self.queue_size:
                self._dropped += 1
                log.debug("store: write-behind queue full; dropped a lower-tier write of %s", key.id)
                return
            self._queue.append((key, blob, tuple(tiers)))
            self._cond.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                key, blob, tiers = self._queue.popleft()
                self._in_flight += 1
            for tier in tiers:
                try:
                    tier.put(key, blob)
                except Exception:  # a tier bug must not kill the thread
                    log.exception("store: write-behind put into the %s tier failed", tier.name)
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write reached its tiers; False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Finish queued writes, stop the write-behind thread and close every tier (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ bytes
    def put(self, key: ChunkKey, blob: bytes) -> bool:
        """Store into the top tier now and the lower tiers behind; False if the top tier refused it."""
        stored = self.tiers[0].put(key, blob)
        self._enqueue(key, blob, self.tiers[1:])
        return stored

    def get(self, key: ChunkKey) -> bytes | None:
        return self._get(key)[0]

    def _get(self, key: ChunkKey) -> tuple[bytes | None, bool]:
        """The blob and whether the tier that served it verified its checksum on the way in."""
        for i, tier in enumerate(self.tiers):
            blob = tier.get(key)
            if blob is not None:
                if i > 0:
                    self.tiers[0].put(key, blob)
                    self._enqueue(key, blob, self.tiers[1:i])
                return blob, tier.verifies_reads
        return None, False

    def contains(self, key: ChunkKey) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def delete(self, key: ChunkKey) -> bool:
        """Remove the entry from every tier; True if any tier held it."""
        removed = [tier.delete(key) for tier in self.tiers]  # every tier: no short-circuit
        return any(removed)

    def list(self, namespace: str) -> list[str]:
        """Digests one namespace stores in any tier (sorted, each once)."""
        return sorted({digest for tier in self.tiers for digest in tier.list(namespace)})

    def match_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading keys of a chained key list the stack holds (stops at the first miss)."""
        for n, key in enumerate(keys):
            if not self.contains(key):
                return n
        return len(keys)

    def stats(self, namespace: str) -> StackStats:
        with self._cond:
            pending, dropped = len(self._queue) + self._in_flight, self._dropped
        return StackStats(tuple(t.stats(namespace) for t in self.tiers), pending, dropped)

    def clear(self, namespace: str | None = None) -> int:
        """Drop a namespace (None: everything) from every tier, after pending writes landed."""
        self.flush()
        return sum(tier.clear(namespace) for tier in self.tiers)

    # ------------------------------------------------------------------ decoded payloads
    def _decoded(self, key: ChunkKey, decode: Callable[[bytes, bool], T]) -> T | None:
        blob, verified = self._get(key)
        if blob is None:
            return None
        try:
            return decode(blob, not verified)  # hash once: skip it if the tier just did
        except CorruptChunk as exc:
            log.warning("store: entry %s is corrupt (%s); deleted from every tier, treated as a miss",
                        key.id, exc)
            self.delete(key)
            return None

    def put_chunk(self, key: ChunkKey, chunk: ChunkKV) -> bool:
        return self.put(key, encode_chunk(chunk))

    def get_chunk(self, key: ChunkKey) -> ChunkKV | None:
        return self._decoded(key, decode_chunk)

    def put_cache(self, key: ChunkKey, payload: CachePayload) -> bool:
        return self.put(key, encode_cache(payload))

    def get_cache(self, key: ChunkKey) -> CachePayload | None:
        return self._decoded(key, decode_cache)
