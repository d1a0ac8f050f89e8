"""Ragged KV storage: the rows of one layer hold different numbers of entries, in pages from one pool.

A head-wise budget (AdaKV, FastGen) lets one KV head keep three times what another keeps. The dense
:class:`~slimkv.cache.KVLayer` pads every row to the longest one, so the padding would eat the saving.
A :class:`RaggedLayer` holds the same entries in fixed-size pages (``block`` entries each, 8 by
default) taken from a pool shared by the layer's rows; a row owns just the pages its entries need.

Contract: the :class:`~slimkv.cache.CacheLayer` interface (``cache/protocol.py``), like the dense
layer, so compressors, the engine and rollback use it unchanged; compressors that give heads
different budgets return one from ``compress`` (``RaggedLayer.from_layer``) when pages take fewer
bytes than padding (:func:`pages_pay`); uniform rows, and short or nearly equal ones, stay in the
dense layer, the fast path. ``view()`` gathers a temporary padded copy of *this* layer only (for
scoring and attention); the storage itself is never padded.

Layout::

    keys, values: [pages, block, head_dim]    model dtype, the layer's page pool
    _pos:         [pages, block]              int32, original token position of each entry
    table:        [batch, kv_heads, P]        int32, the pages of every row in order (-1 = none)
    lengths:      [batch, kv_heads]           int64, valid entries of each row
    entry_states: key -> PagedState           float32 per-entry state, in pages like the keys

Slot ``s`` of row ``(b, h)`` is entry ``s % block`` of page ``table[b, h, s // block]``.

Slack bound: building, ``keep`` and growth give every row exactly ``ceil(length / block)`` pages, so
fewer than ``block`` free slots per row (plus the ``P`` table entries); ``nbytes`` counts every page.
After a rollback (``truncate``) rows keep the pages they had, as a dense layer keeps its free slots,
and later appends reuse them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layer import KVLayer
from .protocol import Room
from .rows import RowLayer
from .state import StateKey

#: Entries per page: a row wastes fewer than this many slots.
BLOCK = 8


def pages_pay(lengths: Tensor, block: int = BLOCK) -> bool:
    """True when rows of ``lengths`` [B, H] take fewer slots in pages than padded to the longest row.

    Short or nearly equal rows are cheaper dense (a page's slack exceeds the padding); callers keep
    the dense layout then, so a layer never holds more than the smaller of the two.
    """
    paged = int(((lengths + block - 1) // block).sum()) * block
    return paged < lengths.numel() * int(lengths.max())


class PagedState:
    """A float32 per-entry state held in pages; indexing reads and writes it as ``[B, H, L]``.

    Supports what compressors do with a dense state tensor: ``state[:, :, :n] += mass``, reads by
    slicing, ``gather``-free reads through :meth:`dense`.
    """

    def __init__(self, layer: RaggedLayer, pool: Tensor) -> None:
        self.layer = layer
        self.pool = pool  # [pages, block] float32

    def dense(self) -> Tensor:
        """``[B, H, L]`` copy over the layer's view (free slots hold stale values)."""
        return self.pool.view(-1)[self.layer._slot_index()]

    def __getitem__(self, index) -> Tensor:
        return self.dense()[index]

    def __setitem__(self, index, value) -> None:
        full = self.dense()
        full[index] = value
        flat = self.layer._slot_index()
        valid = self.layer.valid_mask()
        self.pool.view(-1)[flat[valid]] = full[valid]

    @property
    def shape(self) -> torch.Size:
        return self.dense().shape


class RaggedLayer(RowLayer):
    """Paged per-row KV storage of one attention layer (see the module docstring for the layout)."""

    def __init__(self, block: int = BLOCK) -> None:
        super().__init__()
        if block < 1:
            raise ValueError(f"page size must be >= 1, got {block}")
        self.block = block
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self._pos: Tensor | None = None
        self.table: Tensor | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_layer(cls, layer: RowLayer, block: int = BLOCK) -> RaggedLayer:
        """The entries of ``layer`` (dense or ragged) repacked into pages, per-entry state included."""
        out = cls(block)
        out.scale = layer.scale
        if not layer.initialized:
            return out
        assert layer.lengths is not None
        keys, values, positions = layer.view()
        n = layer.max_length
        states = {k: (v.dense() if isinstance(v, PagedState) else v[:, :, :n])  # type: ignore[index]
                  for k, v in layer.entry_states.items()}
        out._pack(keys, values, positions, layer.lengths.clone(), states)
        return out

    def _pack(self, keys: Tensor, values: Tensor, positions: Tensor, lengths: Tensor,
              states: dict[str, Tensor]) -> None:
        """Store rows given padded: keys/values [B, H, L, D], positions [B, H, L], lengths [B, H]."""
        batch, heads, length, dim = keys.shape
        pages = (lengths + self.block - 1) // self.block  # [B, H]
        width = int(pages.max()) if pages.numel() else 0
        pad = width * self.block - length
        used = torch.arange(width, device=lengths.device) < pages[..., None]  # [B, H, P]

        def paged(t: Tensor) -> Tensor:  # [B, H, L, ...] -> [pages, block, ...] in (b, h, page) order
            if pad > 0:
                t = torch.cat([t, t.new_zeros(batch, heads, pad, *t.shape[3:])], dim=2)
            t = t[:, :, : width * self.block]
            return t.reshape(batch, heads, width, self.block, *t.shape[3:])[used].contiguous()

        self.keys, self.values, self._pos = paged(keys), paged(values), paged(positions.to(torch.int32))
        ids = used.flatten().long().cumsum(0).view(batch, heads, width) - 1
        self.table = torch.where(used, ids, -1).to(torch.int32)
        self.lengths = lengths.to(torch.int64)
        self.entry_states = {k: PagedState(self, paged(v.float())) for k, v in states.items()}

    # ------------------------------------------------------------------ shape and size
    @property
    def initialized(self) -> bool:
        return self.keys is not None

    @property
    def capacity(self) -> int:
        """Slots the widest row can address without new pages."""
        return 0 if self.table is None else self.table.shape[-1] * self.block

    @property
    def positions(self) -> Tensor:
        assert self._pos is not None
        return self._pos.view(-1)[self._slot_index()]

    def nbytes(self) -> int:
        """Every byte: the page pool (keys, values, positions, state), the page table and lengths."""
        tensors = [self.keys, self.values, self._pos, self.table]
        tensors += [s.pool for s in self.entry_states.values()]  # type: ignore[attr-defined]
        return 8 * len(self._rows) + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _slot_index(self) -> Tensor:
        """``[B, H, max_length]`` flat pool index of every slot of the view (free slots: any page)."""
        assert self.table is not None
        n = self._max_len
        width = (n + self.block - 1) // self.block
        pages = self.table[:, :, :width].clamp(min=0).long()  # [B, H, P]
        slots = pages[..., None] * self.block + torch.arange(self.block, device=pages.device)
        return slots.flatten(2)[:, :, :n]

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """A temporary padded copy: keys, values ``[B, H, L, D]`` and positions ``[B, H, L]``."""
        assert self.keys is not None and self.values is not None and self._pos is not None
        flat = self._slot_index()
        dim = self.keys.shape[-1]
        return (self.keys.view(-1, dim)[flat], self.values.view(-1, dim)[flat],
                self._pos.view(-1)[flat])

    # ------------------------------------------------------------------ allocation
    def reserve(self, capacity: int) -> None:
        """Nothing to do: pages are taken when entries arrive (reserving would only add slack)."""

    def growth_bytes(self, tokens: int, cap: int | None = None) -> int:
        """Bytes of the pages ``tokens`` more entries per row would take (at most; a row that kept pages
        after a rollback may need fewer)."""
        if self.keys is None:
            return 0
        pages = sum(max(0, -(-(n + tokens) // self.block) - -(-n // self.block)) for n in self._rows)
        dim, element = self.keys.shape[-1], self.keys.element_size()
        page = self.block * (2 * dim * element + 4 + 4 * len(self.entry_states))
        return pages * page + 4 * len(self._rows) * -(-tokens // self.block)  # pages and table columns

    def entry_state(self, key: StateKey, fill: float = 0.0) -> PagedState:  # type: ignore[override]
        state = self.entry_states.get(key)
        if state is None:
            assert self._pos is not None
            pool = torch.full(self._pos.shape, fill, dtype=torch.float32, device=self._pos.device)
            state = self.entry_states[key] = PagedState(self, pool)
        return state  # type: ignore[return-value]

    def _grow_rows(self, new_lengths: Tensor) -> None:
        """Give every row the pages ``new_lengths`` entries need (exactly; owned pages are reused)."""
        assert self.table is not None and self.keys is not None and self.values is not None
        assert self._pos is not None
        owned = (self.table >= 0).sum(-1)  # [B, H]
        need = ((new_lengths + self.block - 1) // self.block - owned).clamp(min=0)
        total = int(need.sum())
        if total == 0:
            return
        width = int((owned + need).max())
        if width > self.table.shape[-1]:
            self.table = F.pad(self.table, (0, width - self.table.shape[-1]), value=-1)
        first = self.keys.shape[0]

        def more(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros(total, *t.shape[1:])])

        self.keys, self.values, self._pos = more(self.keys), more(self.values), more(self._pos)
        for state in self.entry_states.values():
            state.pool = more(state.pool)  # type: ignore[attr-defined]
        # new page ids, handed out row after row; row r's k-th new page goes to table slot owned + k
        rank = torch.arange(width, device=need.device)
        fresh = (rank >= owned[..., None]) & (rank < (owned + need)[..., None])  # [B, H, P]
        ids = first + fresh.flatten().long().cumsum(0).view(fresh.shape) - 1
        self.table = torch.where(fresh, ids.to(torch.int32), self.table)

    # ------------------------------------------------------------------ writing
    def append(self, keys: Tensor, values: Tensor, positions: Tensor, exact: bool = False,
               cap: int | None = None) -> None:
        """Add entries at the end of every row: keys, values [B, H, T, D], positions [B, T]."""
        assert self.lengths is not None, "a ragged layer is built from entries (from_layer), never empty"
        batch, heads, tokens, _ = keys.shape
        slots = self.lengths[..., None] + torch.arange(tokens, device=keys.device)  # [B, H, T]
        self._grow_rows(self.lengths + tokens)
        self._write(slots, keys, values, positions.to(torch.int32)[:, None, :].expand(batch, heads, tokens))
        self._add_rows(None, tokens)

    def replace(self, room: Room, keys: Tensor, values: Tensor, positions: Tensor, cap: int | None = None) -> None:
        """Decode-phase write of one token per row, over the evicted slot of full rows (see ``Room``)."""
        assert self.lengths is not None
        full = room.full.to(self.lengths.device)
        grown = self.lengths + (~full).long()
        self._grow_rows(grown)
        target = torch.where(full, room.slots, self.lengths)[..., None]  # [B, H, 1]
        batch, heads = full.shape
        self._write(target, keys, values, positions.to(torch.int32)[:, None, :].expand(batch, heads, 1))
        self._add_rows([not f for f in room.full_rows()], 1)

    def _write(self, slots: Tensor, keys: Tensor, values: Tensor, pos: Tensor) -> None:
        """Write [B, H, T] row slots (their pages exist) with keys/values [B, H, T, D], pos [B, H, T]."""
        assert self.table is not None and self.keys is not None and self.values is not None
        assert self._pos is not None
        page = self.table.gather(2, slots // self.block).long()
        flat = (page * self.block + slots % self.block).reshape(-1)
        dim = self.keys.shape[-1]
        self.keys.view(-1, dim)[flat] = keys.reshape(-1, dim).to(self.keys.dtype)
        self.values.view(-1, dim)[flat] = values.reshape(-1, dim).to(self.values.dtype)
        self._pos.view(-1)[flat] = pos.reshape(-1)
        for state in self.entry_states.values():
            state.pool.view(-1)[flat] = 0.0  # type: ignore[attr-defined]

    def keep(self, indices: Tensor, lengths: Tensor | None = None) -> None:
        """Keep the entries at ``indices`` [B, H, k] (rows keep their first ``lengths``); repacked."""
        assert self.lengths is not None
        indices = indices.sort(dim=-1).values
        keys, values, positions = self.view()
        idx = indices[..., None].expand(*indices.shape, keys.shape[-1])
        states = {k: v.dense().gather(2, indices) for k, v in self.entry_states.items()}  # type: ignore[attr-defined]
        k = indices.shape[-1]
        lengths = lengths.clone() if lengths is not None else torch.full_like(self.lengths, k)
        self._pack(keys.gather(2, idx), values.gather(2, idx), positions.gather(2, indices), lengths, states)

    def select_tail(self, lengths: Tensor, index: Tensor) -> None:
        """Keep, of the entries appended since a row held ``lengths`` [B, H], those at offsets ``index``
        [n] (increasing; a verified token tree's path), moved to the slots right after ``lengths``."""
        assert self.keys is not None and self.values is not None and self._pos is not None
        index = index.to(self.keys.device, torch.long)
        if index.numel() and not bool((index[1:] > index[:-1]).all()):
            raise ValueError("select_tail needs increasing offsets")
        lengths = lengths.to(self.keys.device, torch.int64)
        n = index.numel()
        flat = self._slot_index()  # [B, H, L]
        src = flat.gather(2, lengths[..., None] + index).reshape(-1)  # [B * H * n]
        dst = flat.gather(2, lengths[..., None] + torch.arange(n, device=index.device)).reshape(-1)
        dim = self.keys.shape[-1]
        for pool in (self.keys.view(-1, dim), self.values.view(-1, dim), self._pos.view(-1),
                     *(state.pool.view(-1) for state in self.entry_states.values())):  # type: ignore[attr-defined]
            pool[dst] = pool[src].clone()  # read every source before writing (a source may be a target)
        self.truncate(lengths + n)

    def to_dense(self) -> KVLayer:
        """The same entries in a dense, padded :class:`KVLayer` (rows padded to the longest)."""
        assert self.lengths is not None
        keys, values, positions = self.view()
        out = KVLayer.from_entries(keys, values, positions, self.lengths, self.scale)
        out.entry_states = {k: v.dense() for k, v in self.entry_states.items()}  # type: ignore[attr-defined]
        return out

    def clone(self) -> RaggedLayer:
        """An independent copy (compacted: exactly the pages the entries need)."""
        return RaggedLayer.from_layer(self, self.block)
