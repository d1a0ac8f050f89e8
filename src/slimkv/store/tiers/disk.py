"""On-disk tier: one file per entry under a root folder (see ``base.py`` for the contract).

Layout: ``<root>/<namespace>/<digest[:2]>/<digest>.skv``. Writes go to a temporary file in the same
folder and are published with ``os.replace``, which is atomic: readers see a whole old file or a whole
new one, and concurrent writers of the same entry (threads or processes) each publish a complete copy.
Entries survive restarts; the folder may be shared by several processes.

Recency is the file's modification time, refreshed on every hit. When this process's count of bytes
passes ``capacity_bytes`` it rescans the folder (so writes of other processes are counted too) and
deletes the least recently used files until the total is under ``evict_to * capacity_bytes``; with
several writers the folder can therefore briefly exceed the capacity. Every read is verified; a
corrupt file is deleted and reported as a miss. Leftover temporary files older than an hour (a
writer that crashed) are removed when a tier opens the folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from .. import frame
from ..errors import CorruptChunk, StoreError
from ..keys import ChunkKey
from .base import Tier

log = logging.getLogger(__name__)

SUFFIX = ".skv"
STALE_TMP_SECONDS = 3600.0


def _entries(folder: Path) -> list[os.DirEntry]:
    """Entries of a folder; empty if it does not exist (any more) or is not a folder."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


@dataclass(frozen=True)
class _File:
    path: Path
    namespace: str
    size: int
    mtime: float


class DiskTier(Tier):
    """Files under ``root``; ``fsync=True`` also survives power loss, at the cost of write speed."""

    name = "disk"
    verifies_reads = True

    def __init__(self, root: str | os.PathLike, capacity_bytes: int = 10 << 30, fsync: bool = False,
                 evict_to: float = 0.9) -> None:
        super().__init__(capacity_bytes)
        if not 0.0 < evict_to <= 1.0:
            raise ConfigError(f"evict_to must lie in (0, 1], got {evict_to}")
        self.root = Path(root)
        self.fsync, self.evict_to = fsync, evict_to
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the disk tier folder {self.root}: {exc}; pick a writable path"
            ) from exc
        self._lock = threading.Lock()
        self._used = sum(f.size for f in self._scan(None, clean_tmp=True))

    # ------------------------------------------------------------------ files
    def _path(self, key: ChunkKey) -> Path:
        return self.root / key.namespace / key.digest[:2] / f"{key.digest}{SUFFIX}"

    def _scan(self, namespace: str | None, clean_tmp: bool = False) -> list[_File]:
        """Every entry file (of one namespace, or all); vanished files are skipped."""
        out = []
        if namespace is not None:
            tops = [self.root / namespace]
        else:
            tops = [Path(e.path) for e in _entries(self.root)]
        now = time.time()
        for top in tops:
            for sub in _entries(top):
                for entry in _entries(Path(sub.path)):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    if entry.name.endswith(SUFFIX):
                        out.append(_File(Path(entry.path), top.name, st.st_size, st.st_mtime))
                    elif clean_tmp and entry.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_SECONDS:
                        Path(entry.path).unlink(missing_ok=True)
        return out

    def _write(self, path: Path, blob: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ operations
    def put(self, key: ChunkKey, blob: bytes) -> bool:
        if len(blob) > self.capacity_bytes:
            return False
        path = self._path(key)
        try:
            try:
                os.utime(path)  # already stored: equal keys mean equal content, refresh recency only
            except FileNotFoundError:
                self._write(path, blob)
                with self._lock:
                    self._used += len(blob)
        except OSError as exc:
            log.warning("disk tier: cannot write %s: %s", path, exc)
            self.counters.add(key.namespace, "errors")
            return False
        self.counters.add(key.namespace, "puts")
        if self._used > self.capacity_bytes:
            self._evict()
        return True

    def _evict(self) -> None:
        with self._lock:
            files = self._scan(None)
            total = sum(f.size for f in files)
            target = int(self.capacity_bytes * self.evict_to)
            for f in sorted(files, key=lambda f: f.mtime):
                if total <= target:
                    break
                try:
                    f.path.unlink()
                except FileNotFoundError:
                    pass  # another process evicted it first
                total -= f.size
                self.counters.add(f.namespace, "evictions")
            self._used = total

    def get(self, key: ChunkKey) -> bytes | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
            frame.verify(blob)
        except FileNotFoundError:
            self.counters.add(key.namespace, "misses")
            return None
        except CorruptChunk as exc:
            log.warning("disk tier: deleting corrupt entry %s: %s", path, exc)
            path.unlink(missing_ok=True)
            self.counters.add(key.namespace, "corrupt")
            self.counters.add(key.namespace, "misses")
            return None
        except OSError as exc:
            log.warning("disk tier: cannot read %s: %s", path, exc)
            self.counters.add(key.namespace, "errors")
            self.counters.add(key.namespace, "misses")
            return None
        try:
            os.utime(path)
        except OSError:
            pass  # evicted meanwhile; the hit stands
        self.counters.add(key.namespace, "hits")
        return blob

    def contains(self, key: ChunkKey) -> bool:
        return self._path(key).is_file()

    def delete(self, key: ChunkKey) -> bool:
        path = self._path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return False
        with self._lock:
            self._used = max(0, self._used - size)
        return True

    def list(self, namespace: str) -> list[str]:
        return [f.path.name.removesuffix(SUFFIX) for f in self._scan(namespace)]

    def _usage(self, namespace: str) -> tuple[int, int]:
        files = self._scan(namespace)
        return len(files), sum(f.size for f in files)

    def _clear(self, namespace: str | None) -> int:
        removed = 0
        for f in self._scan(namespace):
            try:
                f.path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        with self._lock:
            self._used = sum(f.size for f in self._scan(None))
        return removed

    def used_bytes(self) -> int:
        with self._lock:
            return self._used
