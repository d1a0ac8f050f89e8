"""One layer's KV entries: dense rows per (sequence, KV head), with explicit positions.

Contract: the :class:`~slimkv.cache.CacheLayer` interface (``cache/protocol.py``).

Layout::

    keys, values:  [batch, kv_heads, capacity, head_dim]   model dtype
    _pos:          [batch, kv_heads, capacity]             int32, original token position of each slot
    lengths:       [batch, kv_heads]                       int64, valid entries of each row
    entry_states:  key -> [batch, kv_heads, capacity]      float32 per-entry compressor state

The entries of a row live in slots ``[0, length)``; slots past a row's length are free. Rows may hold
different numbers of entries (different KV heads after decode-phase eviction), and entries inside a
row are unordered: attention masks by *position*, never by slot, so eviction can overwrite any slot.
RoPE was applied to the keys at their original positions, which therefore never change. When KV
heads get different budgets (head-wise allocation, FastGen) the layer is replaced by the paged
:class:`~slimkv.cache.RaggedLayer` (``ragged.py``), which holds each row's own entries plus under
one page.

Growth: prefill reserves exactly the prompt's entries; while decoding a row that runs out of room
grows by ``GROWTH_BLOCK`` slots (never past a decode budget ``cap``), so a layer holds at most
``GROWTH_BLOCK - 1`` free slots per row beyond what rollbacks leave.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .protocol import Room
from .rows import RowLayer
from .state import StateKey

#: Free slots added when a row runs out of room while decoding; bounded slack that ``nbytes`` counts.
GROWTH_BLOCK = 16

Allocator = Callable[[list[tuple[tuple[int, ...], torch.dtype]]], list[Tensor]]


class KVLayer(RowLayer):
    """Dense per-row KV storage of one attention layer (see the module docstring for the layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self._pos: Tensor | None = None
        self._reserved = 0

    # ------------------------------------------------------------------ shape and size
    @property
    def initialized(self) -> bool:
        return self.keys is not None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def positions(self) -> Tensor:
        assert self._pos is not None
        return self._pos[:, :, : self._max_len]

    def nbytes(self) -> int:
        """Every byte this layer holds: keys, values, positions, lengths and per-entry state."""
        tensors = [self.keys, self.values, self._pos, *self.entry_states.values()]
        lengths = 8 * len(self._rows)  # the int64 row counts
        return lengths + sum(t.numel() * t.element_size() for t in tensors if t is not None)  # type: ignore[union-attr]

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values ``[B, H, L, D]`` and positions ``[B, H, L]`` of slots ``[0, max_length)``."""
        n = self._max_len
        assert self.keys is not None and self.values is not None and self._pos is not None
        return self.keys[:, :, :n], self.values[:, :, :n], self._pos[:, :, :n]

    # ------------------------------------------------------------------ allocation
    def _slot_bytes(self, dim: int, element: int) -> int:
        return 2 * dim * element + 4 + 4 * len(self.entry_states)

    def _allocate(self, like: Tensor, batch: int, heads: int, capacity: int) -> None:
        dim = like.shape[-1]
        self.keys = like.new_empty(batch, heads, capacity, dim)
        self.values = like.new_empty(batch, heads, capacity, dim)
        self._pos = torch.zeros(batch, heads, capacity, dtype=torch.int32, device=like.device)
        self._init_rows(batch, heads, like.device)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` slots per row (taken at the first append if not yet allocated)."""
        if self.keys is None:
            self._reserved = max(self._reserved, capacity)
        elif capacity > self.capacity:
            self._resize(capacity)

    def _target(self, extra: int, exact: bool, cap: int | None) -> int:
        """Capacity after making room for ``extra`` more entries (unchanged when they fit)."""
        needed = self._max_len + extra
        if needed <= self.capacity:
            return self.capacity
        target = needed if exact else needed + GROWTH_BLOCK - 1 - (needed - 1) % GROWTH_BLOCK
        return target if cap is None else max(needed, min(target, cap))

    def growth_bytes(self, tokens: int, cap: int | None = None, exact: bool = False) -> int:
        if self.keys is None:
            return 0  # sized by the first append (see ``SlimCache.prefill_bytes``)
        batch, heads, capacity, dim = self.keys.shape
        if cap is not None and self._max_len >= cap:
            return 0  # every row replaces an entry (decode-phase eviction at its budget)
        grow = self._target(tokens, exact, cap) - capacity
        return batch * heads * grow * self._slot_bytes(dim, self.keys.element_size())

    def _resize(self, capacity: int) -> None:
        assert self.keys is not None and self.values is not None and self._pos is not None
        n = min(self._max_len, capacity)

        def grow(t: Tensor) -> Tensor:
            new = t.new_zeros(*t.shape[:2], capacity, *t.shape[3:])
            new[:, :, :n] = t[:, :, :n]
            return new

        self.keys, self.values, self._pos = grow(self.keys), grow(self.values), grow(self._pos)
        self.entry_states = {k: grow(v) for k, v in self.entry_states.items()}  # type: ignore[arg-type]

    def rehome(self, capacity: int, alloc: Allocator) -> None:
        """Move keys, values and positions into storage handed out by ``alloc`` (e.g. a mapped file).

        alloc: ``[(shape, dtype), ...] -> [Tensor, ...]`` for keys, values and positions of
        ``capacity`` slots per row. Valid slots are copied; per-entry state stays in memory. A later
        growth past ``capacity`` moves the layer back to ordinary memory, so reserve enough.
        """
        assert self.keys is not None and self.values is not None and self._pos is not None
        n = self._max_len
        capacity = max(capacity, n)
        b, h, _, d = self.keys.shape
        keys, values, positions = alloc([((b, h, capacity, d), self.keys.dtype),
                                         ((b, h, capacity, d), self.values.dtype),
                                         ((b, h, capacity), self._pos.dtype)])
        keys[:, :, :n] = self.keys[:, :, :n]
        values[:, :, :n] = self.values[:, :, :n]
        positions[:, :, :n] = self._pos[:, :, :n]
        self.keys, self.values, self._pos = keys, values, positions
        self.entry_states = {}

    def entry_state(self, key: StateKey, fill: float = 0.0) -> Tensor:
        """A float32 per-entry state tensor ``[B, H, capacity]`` owned by ``key``; it follows the entries."""
        state = self.entry_states.get(key)
        if state is None:
            assert self.keys is not None
            state = self.entry_states[key] = torch.full(
                self.keys.shape[:3], fill, dtype=torch.float32, device=self.keys.device
            )
        return state  # type: ignore[return-value]

    # ------------------------------------------------------------------ writing
    def append(self, keys: Tensor, values: Tensor, positions: Tensor, exact: bool = False,
               cap: int | None = None) -> None:
        """Add new entries at the end of every row.

        keys, values: [batch, kv_heads, tokens, head_dim]
        positions:    [batch, tokens] original positions of the new tokens
        exact:        grow to exactly the needed capacity (prefill) instead of by ``GROWTH_BLOCK``
        cap:          the most entries a row will ever hold (a decode budget): growth stops there
        """
        batch, heads, tokens, _ = keys.shape
        if self.keys is None:
            self._allocate(keys, batch, heads, max(tokens, self._reserved))
        target = self._target(tokens, exact, cap)
        if target > self.capacity:
            self._resize(target)
        assert self.keys is not None and self.values is not None and self._pos is not None
        pos = positions.to(torch.int32)[:, None, :].expand(batch, heads, tokens)
        if self._uniform:
            start = self._max_len
            self.keys[:, :, start : start + tokens] = keys
            self.values[:, :, start : start + tokens] = values
            self._pos[:, :, start : start + tokens] = pos
            for state in self.entry_states.values():
                state[:, :, start : start + tokens] = 0.0  # type: ignore[index]
        else:
            lengths = self.lengths
            assert lengths is not None
            slots = lengths[..., None] + torch.arange(tokens, device=keys.device)  # [B, H, T]
            self._scatter(slots, keys, values, pos)
        self._add_rows(None, tokens)

    def replace(self, room: Room, keys: Tensor, values: Tensor, positions: Tensor, cap: int | None = None) -> None:
        """Decode-phase write of one new token per row, evicting where a row is full (see ``Room``).

        keys, values: [batch, kv_heads, 1, head_dim]; positions: [batch, 1]
        """
        full_rows = room.full_rows()
        if not any(full_rows):
            self.append(keys, values, positions, cap=cap)
            return
        grows = [not f for f in full_rows]
        if any(n + g > self.capacity for n, g in zip(self._rows, grows)):  # only rows below budget grow
            target = self._target(1, False, cap)
            if target > self.capacity:
                self._resize(target)
        lengths = self.lengths
        assert lengths is not None
        full = room.full.to(lengths.device)
        target_slots = torch.where(full, room.slots, lengths)[..., None]  # [B, H, 1]
        batch, heads = full.shape
        pos = positions.to(torch.int32)[:, None, :].expand(batch, heads, 1)
        self._scatter(target_slots, keys, values, pos)
        self._add_rows(grows, 1)

    def _scatter(self, slots: Tensor, keys: Tensor, values: Tensor, pos: Tensor) -> None:
        assert self.keys is not None and self.values is not None and self._pos is not None
        idx = slots[..., None].expand(*slots.shape, keys.shape[-1])
        self.keys.scatter_(2, idx, keys)
        self.values.scatter_(2, idx, values)
        self._pos.scatter_(2, slots, pos)
        for state in self.entry_states.values():
            state.scatter_(2, slots, 0.0)  # type: ignore[attr-defined]

    def keep(self, indices: Tensor, lengths: Tensor | None = None) -> None:
        """Keep only the entries at ``indices`` and free everything else.

        indices: [batch, kv_heads, k] slots to keep (sorted per row to preserve position order)
        lengths: optional [batch, kv_heads]; rows keep only their first ``lengths`` indices (ragged)
        The new storage holds exactly ``k`` slots per row: the dropped bytes are really released.
        """
        assert self.keys is not None and self.values is not None and self._pos is not None
        indices = indices.sort(dim=-1).values
        idx = indices[..., None].expand(*indices.shape, self.keys.shape[-1])
        self.keys = self.keys.gather(2, idx)
        self.values = self.values.gather(2, idx)
        self._pos = self._pos.gather(2, indices)
        self.entry_states = {k: v.gather(2, indices) for k, v in self.entry_states.items()}  # type: ignore[attr-defined]
        if lengths is None:
            self._set_rows([indices.shape[-1]] * len(self._rows))
        else:
            self.lengths = lengths.to(self.keys.device, torch.int64).clone()

    def select_tail(self, lengths: Tensor, index: Tensor) -> None:
        """Keep, of the entries appended since a row held ``lengths`` entries, those at ``index``.

        lengths: [batch, kv_heads]; index: [n] increasing offsets into the appended entries (the
        accepted path of a verified token tree). The kept entries move, in order, to the slots right
        after ``lengths``; the rest are dropped. Same validity condition as :meth:`truncate`.
        """
        assert self.keys is not None and self.values is not None and self._pos is not None
        index = index.to(self.keys.device, torch.long)
        if index.numel() and not bool((index[1:] > index[:-1]).all()):
            raise ValueError("select_tail needs increasing offsets")
        lengths = lengths.to(self.keys.device, torch.int64)
        n = index.numel()
        for start in lengths.unique().tolist():  # rows that held the same number of entries move together
            rows = lengths == start  # [B, H]
            src = start + index
            for t in (self.keys, self.values, self._pos, *self.entry_states.values()):
                moved = t[:, :, src][rows]  # type: ignore[index]  # [rows, n, ...]
                view = t[:, :, start : start + n]  # type: ignore[index]
                view[rows] = moved
        self.truncate(lengths + n)

    def clone(self) -> KVLayer:
        """An independent copy holding exactly the valid slots (for compress-once, evaluate-many)."""
        out = KVLayer()
        out.scale = self.scale
        if self.keys is None:
            out._reserved = self._reserved
            return out
        n = self._max_len
        assert self.values is not None and self._pos is not None and self._shape is not None
        out._init_rows(*self._shape, self.keys.device)
        out._set_rows(list(self._rows))
        out.keys, out.values = self.keys[:, :, :n].clone(), self.values[:, :, :n].clone()
        out._pos = self._pos[:, :, :n].clone()
        out.entry_states = {k: v[:, :, :n].clone() for k, v in self.entry_states.items()}  # type: ignore[index]
        return out

    # ------------------------------------------------------------------ building
    @classmethod
    def from_entries(cls, keys: Tensor, values: Tensor, positions: Tensor, lengths: Tensor | None = None,
                     scale: float = 1.0) -> KVLayer:
        """A layer holding exactly the given entries.

        keys, values: [batch, kv_heads, L, head_dim]; positions: [batch, kv_heads, L];
        lengths: [batch, kv_heads] entries per row (the rest of each row is free), None = all L
        """
        out = cls()
        out.scale = scale
        out.keys, out.values = keys.contiguous(), values.contiguous()
        out._pos = positions.to(torch.int32).contiguous()
        batch, heads, length = positions.shape
        if lengths is None:
            out._init_rows(batch, heads, keys.device, length)
        else:
            out.lengths = lengths.to(keys.device, torch.int64).clone()
        return out
