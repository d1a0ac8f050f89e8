"""The KV memory pool: one byte budget for the KV every admitted request holds, and where preempted
requests wait.

A compressed request holds fewer bytes, so more requests fit: admission is by bytes. The pool
counts, per request, the larger of what it holds (its caches and compressor state, measured) and
what it reserved ahead of work (a prefill reserves its uncompressed prompt up front). The scheduler
asks :meth:`KVPool.fits` before any work that allocates, and preempts otherwise; the budget is
checked against the measured bytes after every step (:meth:`KVPool.check`).

A preempted request is *parked*: its cache objects are written to a file under the swap directory
(``torch.save``, read back bit for bit), its bytes leave the pool, and it resumes exactly where it
stopped. Nothing is recomputed, so preemption never changes a token.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Share of the machine's available memory the pool takes when no budget is given.
DEFAULT_SHARE = 0.4


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV pool on ``device`` now (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume 4 GiB free


def default_budget(device: torch.device) -> int:
    """The pool's default size: a share (``DEFAULT_SHARE``) of the memory available now."""
    return int(available_memory(device) * DEFAULT_SHARE)


class KVPool:
    """A byte budget over the KV of admitted requests (see the module docstring).

    budget: bytes the requests' KV may hold together
    """

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ConfigError(f"the KV memory budget must be at least one byte, got {budget}")
        self.budget = int(budget)
        self._leases: dict[int, int] = {}
        self.peak = 0  # most bytes the requests held together (measured)

    @property
    def used(self) -> int:
        return sum(self._leases.values())

    @property
    def free(self) -> int:
        return self.budget - self.used

    def held(self, seq_id: int) -> int:
        return self._leases.get(seq_id, 0)

    def fits(self, extra: int) -> bool:
        return self.used + extra <= self.budget

    def lease(self, seq_id: int, nbytes: int) -> None:
        """Set what ``seq_id`` holds or has reserved."""
        self._leases[seq_id] = int(nbytes)

    def release(self, seq_id: int) -> None:
        self._leases.pop(seq_id, None)

    def check(self, measured: int) -> None:
        """After a step: the bytes the requests hold, measured, must be within the budget."""
        self.peak = max(self.peak, measured)
        if measured > self.budget:
            raise RuntimeError(f"KV pool overrun: requests hold {measured} bytes, the budget is {self.budget}")


class SwapSpace:
    """Files where parked requests' KV waits (outside the pool), one per request.

    directory: where to write them (default: a private temporary directory, removed by :meth:`close`)
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self._given = Path(directory) if directory is not None else None
        self._dir: Path | None = None
        self._files: dict[int, Path] = {}
        self.parked_bytes = 0

    def _root(self) -> Path:
        if self._dir is None:
            if self._given is not None:
                self._given.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="slimkv-swap-", dir=self._given))
            else:
                self._dir = Path(tempfile.mkdtemp(prefix="slimkv-swap-"))
        return self._dir

    def park(self, seq_id: int, state: Any) -> int:
        """Write ``state`` (caches and whatever else must survive) to disk; returns the file's size."""
        path = self._root() / f"seq-{seq_id}.pt"
        torch.save(state, path)
        self._files[seq_id] = path
        size = path.stat().st_size
        self.parked_bytes += size
        return size

    def unpark(self, seq_id: int) -> Any:
        """Read back what :meth:`park` wrote (and delete the file)."""
        path = self._files.pop(seq_id)
        try:
            state = torch.load(path, weights_only=False)  # our own file, written by this process
        finally:
            self.parked_bytes -= path.stat().st_size if path.exists() else 0
            path.unlink(missing_ok=True)
        return state

    def drop(self, seq_id: int) -> None:
        path = self._files.pop(seq_id, None)
        if path is not None:
            self.parked_bytes -= path.stat().st_size if path.exists() else 0
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for seq_id in list(self._files):
            self.drop(seq_id)
        if self._dir is not None and self._given is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
