"""What the dense and the paged layer share: rows of entries counted on the device and on the host.

Every row (one sequence's KV head) holds its entries in slots ``[0, length)``. The counts live in
``lengths`` on the layer's device (masks and scatters read them there) and are mirrored on the host
(``host_lengths``): the widest row, whether every row is full, and what a pass will allocate are
read from the host mirror, so the per-layer work of a decode step never waits for the device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .attention import AttentionMeta, attend_rows
from .protocol import CacheLayer
from .state import StateKey


class RowLayer(CacheLayer):
    """Base of :class:`~slimkv.cache.KVLayer` and :class:`~slimkv.cache.RaggedLayer` (row bookkeeping)."""

    def __init__(self) -> None:
        self.lengths: Tensor | None = None  # [B, H] int64 on the layer's device
        self._rows: list[int] = []  # the same counts on the host, row-major
        self._max_len = 0
        self._uniform = True
        self.scale = 1.0
        self.entry_states: dict[StateKey, object] = {}

    # ------------------------------------------------------------------ row counts
    @property
    def max_length(self) -> int:
        return self._max_len

    @property
    def uniform(self) -> bool:
        return self._uniform

    def entries(self) -> int:
        return sum(self._rows)

    def host_lengths(self) -> list[int]:
        """Entries of every row, row-major (``lengths`` read without touching the device)."""
        return list(self._rows)

    def valid_mask(self) -> Tensor:
        assert self.lengths is not None
        idx = torch.arange(self._max_len, device=self.lengths.device)
        return idx < self.lengths[..., None]

    def _set_rows(self, rows: list[int]) -> None:
        self._rows = rows
        self._max_len = max(rows, default=0)
        self._uniform = min(rows, default=0) == self._max_len

    def _rows_from_device(self) -> None:
        """Mirror ``lengths`` on the host (after an operation that computed them on the device)."""
        assert self.lengths is not None
        self._set_rows([int(n) for n in self.lengths.flatten().tolist()])

    def _add_rows(self, grown: list[bool] | None, tokens: int) -> None:
        """Host side of ``lengths += tokens`` (only where ``grown``, when given)."""
        if grown is None:
            self._set_rows([n + tokens for n in self._rows])
        else:
            self._set_rows([n + tokens if g else n for n, g in zip(self._rows, grown)])

    # ------------------------------------------------------------------ rollback
    def truncate(self, lengths: Tensor) -> None:
        """Forget the entries appended since a row held ``lengths`` entries (speculative rollback).

        lengths: [batch, kv_heads], at most the current lengths. Valid only when, since the row held
        ``lengths`` entries, it was only appended to (no ``replace`` or ``keep``): the dropped entries
        are then exactly the slots ``[lengths, current)``, and what remains is bit for bit the row as
        it was. Free slots stay allocated (``nbytes`` counts them) and later appends reuse them.
        """
        assert self.lengths is not None
        rows = [int(n) for n in lengths.flatten().tolist()]
        if any(new > old for new, old in zip(rows, self._rows)):
            raise ValueError("truncate can only drop entries, not add them")
        self.lengths = lengths.to(self.lengths.device, torch.int64).clone()
        self._set_rows(rows)

    # ------------------------------------------------------------------ per-entry state
    def get_entry_state(self, key: StateKey) -> Tensor | None:
        return self.entry_states.get(key)  # type: ignore[return-value]

    def retain_entry_states(self, keys: Iterable[StateKey]) -> None:
        keep = set(keys)
        self.entry_states = {k: v for k, v in self.entry_states.items() if k in keep}

    # ------------------------------------------------------------------ reading
    def attend(self, query: Tensor, meta: AttentionMeta) -> tuple[Tensor, Tensor | None]:
        keys, values, positions = self.view()
        return attend_rows(query, keys, values, positions, meta, valid=None if self._uniform else self.valid_mask())
