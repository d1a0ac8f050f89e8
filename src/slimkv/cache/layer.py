"""One layer's KV entries: dense rows per (sequence, KV head), with explicit positions.

Contract (who calls what, in which order):

1. The engine creates an empty :class:`KVLayer` per model layer and may ``reserve`` room for a
   prompt it is about to prefill.
2. During every forward pass the attention function (``models/adapter.py``) calls ``append`` with
   the new keys and values, then ``attend`` with the new queries.
3. Compressors shrink the layer between or during forward passes with ``keep`` (prefill phase:
   keep a subset) or ``replace`` (decode phase: overwrite one evicted entry per row with the new
   token), and may keep per-entry state in ``slot_state`` (moved along with the entries).
4. Reports read ``nbytes`` (every allocated byte) and ``entries`` (valid entries).

Layout::

    keys, values: [batch, kv_heads, capacity, head_dim]   model dtype
    positions:    [batch, kv_heads, capacity]             int32, original token position of each entry
    lengths:      [batch, kv_heads]                       int64, valid entries of each row
    slot_state:   name -> [batch, kv_heads, capacity]     float32 per-entry compressor state

The entries of a row live in slots ``[0, length)``; slots past a row's length are free. Rows may hold
different numbers of entries (different sequences of a batch, or different KV heads), and entries
inside a row are unordered: attention masks by *position*, never by slot, so eviction can overwrite
any slot. RoPE was applied to the keys at their original positions, which therefore never change.
Rows of different lengths are padded to the longest here; when KV heads get different budgets
(head-wise allocation, FastGen) the layer is replaced by the paged :class:`~slimkv.cache.RaggedLayer`
(``ragged.py``), which holds each row's own entries plus under one page.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import attend_rows

#: Free slots added when a row runs out of room while decoding; bounded slack that ``nbytes`` counts.
GROWTH_BLOCK = 64


class KVLayer:
    """Dense per-row KV storage of one attention layer (see the module docstring for the layout)."""

    quantized = False  # see ``QuantizedLayer``

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.positions: Tensor | None = None
        self.lengths: Tensor | None = None
        self.slot_state: dict[str, Tensor] = {}
        self.extra: dict[str, Tensor] = {}  # per-layer compressor state that is not per entry
        self.scale = 1.0  # softmax scale of the attention reading this layer (set by the engine)
        self._max_len = 0
        self._uniform = True  # every row holds the same number of entries
        self._reserved = 0

    # ------------------------------------------------------------------ shape and size
    @property
    def initialized(self) -> bool:
        return self.keys is not None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def max_length(self) -> int:
        """Largest number of valid entries in any row; slots ``>= max_length`` are free everywhere."""
        return self._max_len

    @property
    def uniform(self) -> bool:
        """True when every row holds exactly ``max_length`` entries (no free slot is inside the view)."""
        return self._uniform

    def entries(self) -> int:
        """Valid (kept) entries summed over all rows."""
        return 0 if self.lengths is None else int(self.lengths.sum())

    def nbytes(self) -> int:
        """Every byte this layer holds: keys, values, positions, lengths and per-entry state."""
        tensors = [self.keys, self.values, self.positions, self.lengths, *self.slot_state.values()]
        tensors += list(self.extra.values())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values ``[B, H, L, D]`` and positions ``[B, H, L]`` of slots ``[0, max_length)``."""
        n = self._max_len
        assert self.keys is not None and self.values is not None and self.positions is not None
        return self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :, :n]

    def valid_mask(self) -> Tensor:
        """``[B, H, L]`` bool: which slots of the view hold entries."""
        assert self.lengths is not None
        idx = torch.arange(self._max_len, device=self.lengths.device)
        return idx < self.lengths[..., None]

    # ------------------------------------------------------------------ allocation
    def _allocate(self, like: Tensor, batch: int, heads: int, capacity: int) -> None:
        dim = like.shape[-1]
        self.keys = like.new_empty(batch, heads, capacity, dim)
        self.values = like.new_empty(batch, heads, capacity, dim)
        self.positions = torch.zeros(batch, heads, capacity, dtype=torch.int32, device=like.device)
        self.lengths = torch.zeros(batch, heads, dtype=torch.int64, device=like.device)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` slots per row (taken at the first append if not yet allocated)."""
        if self.keys is None:
            self._reserved = max(self._reserved, capacity)
        elif capacity > self.capacity:
            self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        assert self.keys is not None and self.values is not None and self.positions is not None
        n = min(self._max_len, capacity)

        def grow(t: Tensor) -> Tensor:
            new = t.new_zeros(*t.shape[:2], capacity, *t.shape[3:])
            new[:, :, :n] = t[:, :, :n]
            return new

        self.keys, self.values, self.positions = grow(self.keys), grow(self.values), grow(self.positions)
        self.slot_state = {k: grow(v) for k, v in self.slot_state.items()}

    def rehome(self, capacity: int, alloc) -> None:
        """Move keys, values and positions into storage handed out by ``alloc`` (e.g. a mapped file).

        alloc: ``[(shape, dtype), ...] -> [Tensor, ...]`` for keys, values and positions of
        ``capacity`` slots per row. Valid slots are copied; per-entry state stays in memory. A later
        growth past ``capacity`` moves the layer back to ordinary memory, so reserve enough.
        """
        assert self.keys is not None and self.values is not None and self.positions is not None
        n = self._max_len
        capacity = max(capacity, n)
        b, h, _, d = self.keys.shape
        keys, values, positions = alloc([((b, h, capacity, d), self.keys.dtype),
                                         ((b, h, capacity, d), self.values.dtype),
                                         ((b, h, capacity), self.positions.dtype)])
        keys[:, :, :n] = self.keys[:, :, :n]
        values[:, :, :n] = self.values[:, :, :n]
        positions[:, :, :n] = self.positions[:, :, :n]
        self.keys, self.values, self.positions = keys, values, positions
        self.slot_state = {}

    def _ensure_room(self, extra: int, exact: bool, cap: int | None = None) -> None:
        """Grow to hold ``extra`` more entries: exactly, or by ``GROWTH_BLOCK`` but never past ``cap``."""
        needed = self._max_len + extra
        if needed > self.capacity:
            target = needed if exact else needed + GROWTH_BLOCK - 1 - (needed - 1) % GROWTH_BLOCK
            if cap is not None:
                target = max(needed, min(target, cap))
            self._resize(target)

    def new_slot_state(self, name: str, fill: float = 0.0) -> Tensor:
        """Create (or return) a float32 per-entry state tensor that follows the entries around."""
        if name not in self.slot_state:
            assert self.keys is not None
            self.slot_state[name] = torch.full(
                self.keys.shape[:3], fill, dtype=torch.float32, device=self.keys.device
            )
        return self.slot_state[name]

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
        self._ensure_room(tokens, exact, cap)
        assert self.keys is not None and self.values is not None
        assert self.positions is not None and self.lengths is not None
        pos = positions.to(torch.int32)[:, None, :].expand(batch, heads, tokens)
        if self._uniform:
            start = self._max_len
            self.keys[:, :, start : start + tokens] = keys
            self.values[:, :, start : start + tokens] = values
            self.positions[:, :, start : start + tokens] = pos
            for state in self.slot_state.values():
                state[:, :, start : start + tokens] = 0.0
        else:
            slots = self.lengths[..., None] + torch.arange(tokens, device=keys.device)  # [B, H, T]
            self._scatter(slots, keys, values, pos)
        self.lengths += tokens
        self._max_len += tokens

    def replace(self, slots: Tensor, full: Tensor, keys: Tensor, values: Tensor, positions: Tensor,
                cap: int | None = None) -> None:
        """Decode-phase write of one new token per row, evicting where a row is full.

        slots:     [batch, kv_heads] slot of the evicted entry, used only where ``full``
        full:      [batch, kv_heads] bool, rows at their budget (others grow by one)
        keys, values: [batch, kv_heads, 1, head_dim]; positions: [batch, 1]
        """
        assert self.lengths is not None
        if not bool(full.any()):
            self.append(keys, values, positions, cap=cap)
            return
        if int((self.lengths + (~full).long()).max()) > self.capacity:  # only rows below budget grow
            self._ensure_room(1, exact=False, cap=cap)
        target = torch.where(full, slots, self.lengths)[..., None]  # [B, H, 1]
        batch, heads = full.shape
        pos = positions.to(torch.int32)[:, None, :].expand(batch, heads, 1)
        self._scatter(target, keys, values, pos)
        self.lengths += (~full).long()
        self._refresh_lengths()

    def _scatter(self, slots: Tensor, keys: Tensor, values: Tensor, pos: Tensor) -> None:
        assert self.keys is not None and self.values is not None and self.positions is not None
        idx = slots[..., None].expand(*slots.shape, keys.shape[-1])
        self.keys.scatter_(2, idx, keys)
        self.values.scatter_(2, idx, values)
        self.positions.scatter_(2, slots, pos)
        for state in self.slot_state.values():
            state.scatter_(2, slots, 0.0)

    def keep(self, indices: Tensor, lengths: Tensor | None = None) -> None:
        """Keep only the entries at ``indices`` and free everything else.

        indices: [batch, kv_heads, k] slots to keep (sorted per row to preserve position order)
        lengths: optional [batch, kv_heads]; rows keep only their first ``lengths`` indices (ragged)
        The new storage holds exactly ``k`` slots per row: the dropped bytes are really released.
        """
        assert self.keys is not None and self.values is not None and self.positions is not None
        indices = indices.sort(dim=-1).values
        idx = indices[..., None].expand(*indices.shape, self.keys.shape[-1])
        self.keys = self.keys.gather(2, idx)
        self.values = self.values.gather(2, idx)
        self.positions = self.positions.gather(2, indices)
        self.slot_state = {k: v.gather(2, indices) for k, v in self.slot_state.items()}
        k = indices.shape[-1]
        self.lengths = lengths.clone() if lengths is not None else torch.full_like(self.lengths, k)
        self._refresh_lengths()

    def truncate(self, lengths: Tensor) -> None:
        """Forget the entries appended since a row held ``lengths`` entries (speculative rollback).

        lengths: [batch, kv_heads], at most the current lengths. Valid only when, since the row held
        ``lengths`` entries, it was only appended to (no ``replace`` or ``keep``): the dropped entries
        are then exactly the slots ``[lengths, current)``, and what remains is bit for bit the row as
        it was. Free slots are kept allocated (``nbytes`` counts them, as after any growth).
        """
        assert self.lengths is not None
        if bool((lengths > self.lengths).any()):
            raise ValueError("truncate can only drop entries, not add them")
        self.lengths = lengths.to(self.lengths.device, torch.int64).clone()
        self._refresh_lengths()

    def select_tail(self, lengths: Tensor, index: Tensor) -> None:
        """Keep, of the entries appended since a row held ``lengths`` entries, those at ``index``.

        lengths: [batch, kv_heads]; index: [n] increasing offsets into the appended entries (the
        accepted path of a verified token tree). The kept entries move, in order, to the slots right
        after ``lengths``; the rest are dropped. Same validity condition as :meth:`truncate`.
        """
        assert self.keys is not None and self.values is not None and self.positions is not None
        index = index.to(self.keys.device, torch.long)
        if index.numel() and not bool((index[1:] > index[:-1]).all()):
            raise ValueError("select_tail needs increasing offsets")
        lengths = lengths.to(self.keys.device, torch.int64)
        n = index.numel()
        for start in lengths.unique().tolist():  # rows that held the same number of entries move together
            rows = lengths == start  # [B, H]
            src = start + index
            for t in (self.keys, self.values, self.positions, *self.slot_state.values()):
                moved = t[:, :, src][rows]  # [rows, n, ...]
                view = t[:, :, start : start + n]
                view[rows] = moved
        self.truncate(lengths + n)

    def _refresh_lengths(self) -> None:
        assert self.lengths is not None
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        self._max_len, self._uniform = hi, lo == hi

    # ------------------------------------------------------------------ reading
    def attend(
        self,
        query: Tensor,
        query_positions: Tensor,
        scale: float,
        new_tokens: int,
        sliding_window: int | None = None,
        softcap: float | None = None,
        want_key_mass: bool = False,
        mask_cache: dict | None = None,
        tree: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of new queries over this layer's entries (call after ``append``).

        query: [batch, q_heads, tokens, head_dim]; query_positions: [batch, tokens]
        new_tokens: how many of the entries were appended by this forward pass
        tree: [tokens, tokens] bool, which new tokens each new token sees (token-tree verification)
        Returns the output ``[batch, q_heads, tokens, head_dim]`` and, if asked, the attention
        mass each entry received ``[batch, kv_heads, L]`` (summed over the queries of its group).
        """
        keys, values, positions = self.view()
        valid = None if self._uniform else self.valid_mask()
        return attend_rows(
            query, keys, values, positions, query_positions, scale,
            valid=valid, new_tokens=new_tokens, sliding_window=sliding_window,
            softcap=softcap, want_key_mass=want_key_mass, mask_cache=mask_cache, tree=tree,
        )

    def clone(self) -> KVLayer:
        """An independent copy holding exactly the valid slots (for compress-once, evaluate-many)."""
        out = KVLayer()
        out.scale, out._max_len, out._uniform = self.scale, self._max_len, self._uniform
        if self.keys is None:
            out._reserved = self._reserved
            return out
        n = self._max_len
        assert self.values is not None and self.positions is not None and self.lengths is not None
        out.keys, out.values = self.keys[:, :, :n].clone(), self.values[:, :, :n].clone()
        out.positions, out.lengths = self.positions[:, :, :n].clone(), self.lengths.clone()
        out.slot_state = {k: v[:, :, :n].clone() for k, v in self.slot_state.items()}
        out.extra = {k: v.clone() for k, v in self.extra.items()}
        return out

    # ------------------------------------------------------------------ batching
    @classmethod
    def stack(cls, layers: list[KVLayer]) -> KVLayer:
        """One layer holding the rows of several single-sequence layers (ragged lengths allowed)."""
        out = cls()
        if not layers or any(not layer.initialized for layer in layers):
            return out
        cap = max(layer.max_length for layer in layers)

        def cat(get) -> Tensor:
            parts = []
            for layer in layers:
                t = get(layer)[:, :, :cap]
                if t.shape[2] < cap:
                    pad = t.new_zeros(*t.shape[:2], cap - t.shape[2], *t.shape[3:])
                    t = torch.cat([t, pad], dim=2)
                parts.append(t)
            return torch.cat(parts, dim=0)

        out.keys = cat(lambda layer: layer.keys)
        out.values = cat(lambda layer: layer.values)
        out.positions = cat(lambda layer: layer.positions)
        out.lengths = torch.cat([layer.lengths for layer in layers], dim=0)
        names = set.intersection(*(set(layer.slot_state) for layer in layers))
        out.slot_state = {n: cat(lambda layer, n=n: layer.slot_state[n]) for n in names}
        # per-sequence compressor state (batch first, e.g. FastGen's per-head policies) stacks too
        for n in set.intersection(*(set(layer.extra) for layer in layers)):
            parts = [layer.extra[n] for layer in layers]
            if all(t.dim() > 0 and t.shape[1:] == parts[0].shape[1:] for t in parts):
                out.extra[n] = torch.cat(parts, dim=0)
        out._refresh_lengths()
        return out
