"""In-process tier: blobs in an LRU-ordered dict, bounded in bytes (see ``base.py`` for the contract).

Blobs here were written by this process and never leave it, so reads are not re-verified (the codec
verifies on decode anyway). Eviction is one LRU across namespaces.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from ..keys import ChunkKey
from .base import Tier

log = logging.getLogger(__name__)


class MemoryTier(Tier):
    """LRU byte store in this process's memory; ``get`` and ``put`` refresh an entry's recency."""

    name = "memory"

    def __init__(self, capacity_bytes: int = 1 << 30) -> None:
        super().__init__(capacity_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # LRU first
        self._used = 0

    def put(self, key: ChunkKey, blob: bytes) -> bool:
        blob = bytes(blob)
        if len(blob) > self.capacity_bytes:
            log.debug("memory tier: %d-byte entry exceeds the %d-byte capacity",
                      len(blob), self.capacity_bytes)
            return False
        ident = (key.namespace, key.digest)
        evicted = []
        with self._lock:
            old = self._entries.pop(ident, None)
            self._used += len(blob) - (0 if old is None else len(old))
            self._entries[ident] = blob
            while self._used > self.capacity_bytes:
                (ns, _), victim = self._entries.popitem(last=False)
                self._used -= len(victim)
                evicted.append(ns)
        self.counters.add(key.namespace, "puts")
        for ns in evicted:
            self.counters.add(ns, "evictions")
        return True

    def get(self, key: ChunkKey) -> bytes | None:
        ident = (key.namespace, key.digest)
        with self._lock:
            blob = self._entries.get(ident)
            if blob is not None:
                self._entries.move_to_end(ident)
        self.counters.add(key.namespace, "misses" if blob is None else "hits")
        return blob

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return (key.namespace, key.digest) in self._entries

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            blob = self._entries.pop((key.namespace, key.digest), None)
            if blob is not None:
                self._used -= len(blob)
        return blob is not None

    def list(self, namespace: str) -> list[str]:
        with self._lock:
            return [digest for ns, digest in self._entries if ns == namespace]

    def _usage(self, namespace: str) -> tuple[int, int]:
        with self._lock:
            sizes = [len(b) for (ns, _), b in self._entries.items() if ns == namespace]
        return len(sizes), sum(sizes)

    def _clear(self, namespace: str | None) -> int:
        with self._lock:
            victims = [k for k in self._entries if namespace is None or k[0] == namespace]
            for ident in victims:
                self._used -= len(self._entries.pop(ident))
        return len(victims)

    def used_bytes(self) -> int:
        with self._lock:
            return self._used
