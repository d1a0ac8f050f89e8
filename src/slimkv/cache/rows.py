"""What the dense and the paged layer share: rows of entries counted on the host, mirrored on the device.

Every row (one sequence's KV head) holds its entries in slots ``[0, length)``. The counts live on
the host (``host_lengths``): the widest row, whether every row is full, what a pass will allocate and
what a decode kernel reads come from there, so the per-layer work of a decode step never waits for
the device. ``lengths`` is their device copy, made when something reads it (masks, scatters) and
dropped whenever the counts change.
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
        self._rows: list[int] = []  # entries of every row, row-major: the truth
        self._shape: tuple[int, int] | None = None  # (batch, kv_heads)
        self._device: torch.device | None = None
        self._lengths: Tensor | None = None  # device copy of ``_rows``, made on demand
        self._max_len = 0
        self._uniform = True
        self.scale = 1.0
        self.entry_states: dict[StateKey, object] = {}

    @property
    def lengths(self) -> Tensor | None:  # type: ignore[override]
        """``[batch, kv_heads]`` int64 on the layer's device (a copy of the host counts)."""
        if self._lengths is None and self._shape is not None:
            self._lengths = torch.tensor(self._rows, dtype=torch.int64, device=self._device).view(self._shape)
        return self._lengths

    @lengths.setter
    def lengths(self, value: Tensor | None) -> None:
        """Counts computed on the device (``keep``, a rollback): mirrored on the host at once."""
        if value is None:
            self._shape, self._lengths = None, None
            self._set_rows([])
            return
        value = value.to(torch.int64)
        self._shape, self._device = (value.shape[0], value.shape[1]), value.device
        self._set_rows([int(n) for n in value.flatten().tolist()])
        self._lengths = value

    def _init_rows(self, batch: int, heads: int, device: torch.device, length: int = 0) -> None:
        self._shape, self._device = (batch, heads), device
        self._set_rows([length] * (batch * heads))

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
        self._lengths = None

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
        rows = [int(n) for n in lengths.flatten().tolist()]
        if any(new > old for new, old in zip(rows, self._rows)):
            raise ValueError("truncate can only drop entries, not add them")
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
