"""The storage-tier interface: a byte store keyed by :class:`~slimkv.store.keys.ChunkKey`.

Contract (after LMCache's ``storage_backend``; who calls what):

* The :class:`~slimkv.store.stack.TierStack` (or a test) is a tier's only caller. It may call from
  several threads at once; every tier is thread-safe.
* ``put(key, blob) -> bool`` stores an encoded blob (a :mod:`~slimkv.store.frame` envelope); False
  when it was not stored (larger than the tier, tier unavailable). Storing an existing key replaces or
  keeps it: equal keys mean equal content. May evict least-recently-used entries of *any* namespace
  to stay within ``capacity_bytes``.
* ``get(key) -> bytes | None``: the blob, or None on a miss. A tier that keeps bytes outside this
  process verifies the envelope on every read; a corrupt entry is deleted, logged and reported as a
  miss. ``get`` never raises for a missing, corrupt or unreachable entry.
* ``contains(key)``, ``delete(key) -> bool`` (True if something was removed).
* ``list(namespace) -> list[str]``: digests stored in one namespace; ``stats(namespace)``: counts and
  bytes of one namespace; ``clear(namespace)``: drop one namespace (``None``: everything, for
  operators). No operation taking a namespace ever reads or reports another namespace's entries.
* ``used_bytes()``: every byte the tier holds (operator view, all namespaces); ``close()`` last.

Sizes are blob sizes (``len(blob)``); file-system and Redis overheads are not counted.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, fields

from ...errors import ConfigError
from ..keys import ChunkKey, check_namespace


@dataclass(frozen=True)
class TierStats:
    """One namespace's view of one tier.

    entries, bytes: what the namespace currently stores in the tier
    hits, misses, puts: operations of this process on the namespace
    evictions: entries of the namespace this process evicted for room
    corrupt: entries of the namespace found corrupt (and deleted) by this process
    errors: operations that failed for another reason (I/O error, unreachable server)
    """

    tier: str
    namespace: str
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    corrupt: int = 0
    errors: int = 0


_COUNTERS = tuple(
    f.name for f in fields(TierStats) if f.name not in ("tier", "namespace", "entries", "bytes")
)


class Counters:
    """Per-namespace operation counters of one tier (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_COUNTERS, 0))

    def add(self, namespace: str, counter: str, n: int = 1) -> None:
        with self._lock:
            self._counts[namespace][counter] += n

    def snapshot(self, tier: str, namespace: str, entries: int, nbytes: int) -> TierStats:
        with self._lock:
            counts = dict(self._counts.get(namespace, dict.fromkeys(_COUNTERS, 0)))
        return TierStats(tier=tier, namespace=namespace, entries=entries, bytes=nbytes, **counts)

    def reset(self, namespace: str | None) -> None:
        with self._lock:
            if namespace is None:
                self._counts.clear()
            else:
                self._counts.pop(namespace, None)


class Tier(ABC):
    """One storage tier (see the module docstring for the contract).

    name: short label for logs and stats (``"memory"``, ``"disk"``, ``"redis"``)
    capacity_bytes: most bytes of blobs the tier holds before it evicts
    """

    name: str = "tier"
    #: True when ``get`` verifies a blob's checksum before returning it (tiers holding bytes that
    #: left the process); the stack then decodes without hashing the blob a second time.
    verifies_reads: bool = False

    def __init__(self, capacity_bytes: int) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError(
                f"{type(self).__name__} capacity_bytes must be a positive integer, got {capacity_bytes!r}"
            )
        self.capacity_bytes = capacity_bytes
        self.counters = Counters()

    @abstractmethod
    def put(self, key: ChunkKey, blob: bytes) -> bool: ...

    @abstractmethod
    def get(self, key: ChunkKey) -> bytes | None: ...

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool: ...

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool: ...

    @abstractmethod
    def list(self, namespace: str) -> list[str]: ...

    @abstractmethod
    def _usage(self, namespace: str) -> tuple[int, int]:
        """Entries and bytes one namespace stores in this tier."""

    @abstractmethod
    def _clear(self, namespace: str | None) -> int:
        """Remove one namespace's entries (all for None); return how many were removed."""

    @abstractmethod
    def used_bytes(self) -> int: ...

    def stats(self, namespace: str) -> TierStats:
        entries, nbytes = self._usage(check_namespace(namespace))
        return self.counters.snapshot(self.name, namespace, entries, nbytes)

    def clear(self, namespace: str | None = None) -> int:
        """Drop one namespace (or, with None, everything) and its counters; return entries removed."""
        removed = self._clear(None if namespace is None else check_namespace(namespace))
        self.counters.reset(namespace)
        return removed

    def close(self) -> None:
        """Release resources; the tier is not used afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity_bytes={self.capacity_bytes})"
