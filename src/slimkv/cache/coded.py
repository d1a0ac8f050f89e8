"""What the two coded layers share: old entries stored as codes, the newest in a dense residual.

:class:`~slimkv.cache.QuantizedLayer` (KIVI's packed codes) and :class:`~slimkv.cache.vq.VQLayer`
(CommVQ's codebook indices) differ in how entries are coded and read; how they grow, roll back, count
entries and refuse eviction is the same, and lives here. Per row, entries are held in time order as::

    [ prefix (dense, e.g. attention sinks) | coded entries | residual (dense, newest) ]

A subclass sets ``quantized_length`` (coded entries per row), optionally ``prefix_length``, and
``_flush`` (code the residual's oldest complete groups; called at the start of every append, so a
token is always attended in full precision during the pass that created it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import AttentionMeta, attend_rows
from .layer import KVLayer
from .protocol import CacheLayer

INT16_MAX = 32767
#: newest entries never coded by a later append, so that a speculative rollback (``truncate``, at most
#: this many entries deep) only ever drops full-precision entries
ROLLBACK_SLACK = 16


class CodedLayer(CacheLayer):
    """Base of the coded layers (see the module docstring); the :class:`CacheLayer` interface."""

    quantized = True

    def __init__(self, residual: KVLayer, dtype: torch.dtype) -> None:
        self.residual = residual
        self.dtype = dtype
        self.scale = residual.scale
        self.positions_q: Tensor | None = None  # [B, 1 or H, Q] int16/int32 positions of the coded entries
        self.lengths: Tensor | None = None

    # ------------------------------------------------------------------ what a subclass provides
    @property
    def quantized_length(self) -> int:
        raise NotImplementedError

    @property
    def prefix_length(self) -> int:
        """Dense entries held before the coded ones (none unless a subclass keeps some)."""
        return 0

    def _flush(self) -> None:
        raise NotImplementedError

    def _fast_attention(self, query: Tensor, meta: AttentionMeta) -> Tensor | None:
        """Attention read straight from the codes when this call allows it (a subclass decides), else None."""
        return None

    # ------------------------------------------------------------------ shape and size
    @property
    def initialized(self) -> bool:
        return True

    @property
    def uniform(self) -> bool:
        return True

    @property
    def max_length(self) -> int:
        return self.prefix_length + self.quantized_length + self.residual.max_length

    @property
    def capacity(self) -> int:
        return self.prefix_length + self.quantized_length + self.residual.capacity

    def entries(self) -> int:
        return 0 if self.lengths is None else int(self.lengths.sum())

    def valid_mask(self) -> Tensor:
        assert self.lengths is not None
        return torch.ones(*self.lengths.shape, self.max_length, dtype=torch.bool, device=self.lengths.device)

    def simple_read(self, query: Tensor, meta: AttentionMeta, oldest: Tensor) -> bool:
        """True when one query token sees every entry (decoding: no soft-cap, no mass, no window bite).

        oldest: positions of the oldest entries (the window check reads them only on sliding-window layers)
        """
        simple = meta.softcap is None and not meta.key_mass and query.shape[2] == 1 and self.quantized_length > 0
        if simple and meta.sliding_window is not None:
            simple = int(meta.positions.max()) - int(oldest.min()) < meta.sliding_window
        return simple

    def attend(self, query: Tensor, meta: AttentionMeta) -> tuple[Tensor, Tensor | None]:
        """Attention of new queries over this layer (call after ``append``); see ``CacheLayer.attend``.

        The fast path reads the codes directly (one query token seeing every entry); otherwise the
        layer is decoded (this layer only) and read like a dense one.
        """
        fast = self._fast_attention(query, meta)
        if fast is not None:
            return fast, None
        keys, values, positions = self.view()
        return attend_rows(query, keys, values, positions, meta)

    # ------------------------------------------------------------------ writing
    def reserve(self, capacity: int) -> None:
        self.residual.reserve(max(0, capacity - self.prefix_length - self.quantized_length))

    def growth_bytes(self, tokens: int, cap: int | None = None) -> int:
        """The residual grows exactly; coding its oldest groups at the next append only frees bytes."""
        return self.residual.growth_bytes(tokens, exact=True)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor, exact: bool = False,
               cap: int | None = None) -> None:
        """New entries go to the residual (after complete groups of older ones are coded).

        keys, values: [batch, kv_heads, tokens, head_dim]; positions: [batch, tokens]
        The residual always grows to exactly the room it needs (``exact`` is implied).
        """
        self._flush()
        self.residual.append(keys, values, positions, exact=True)
        assert self.lengths is not None
        self.lengths += keys.shape[2]

    def truncate(self, lengths: Tensor) -> None:
        """Forget entries appended since rows held ``lengths`` (speculative rollback, see KVLayer).

        Only full-precision entries can be dropped: appends keep the newest ``ROLLBACK_SLACK``
        entries uncoded, so rollbacks up to that depth always succeed.
        """
        assert self.lengths is not None
        fixed = self.prefix_length + self.quantized_length
        if bool((lengths < fixed).any()):
            raise ValueError(f"cannot roll back into quantized entries (rollback deeper than {ROLLBACK_SLACK})")
        self.residual.truncate(lengths.to(self.lengths.device, torch.int64) - fixed)
        self.lengths = lengths.to(self.lengths.device, torch.int64).clone()


# ---------------------------------------------------------------------- helpers
def dense_slice(keys: Tensor, values: Tensor, positions: Tensor, start: int, stop: int, scale: float) -> KVLayer:
    """A dense layer, grown exactly, of entries ``[start, stop)`` of ``[B, H, L, D]`` keys and values."""
    return KVLayer.from_entries(keys[:, :, start:stop].clone(), values[:, :, start:stop].clone(),
                                positions[:, :, start:stop].clone(), scale=scale)


def compact_positions(positions: Tensor) -> Tensor:
    """``[B, H, n]`` positions in the narrowest form: one row if all heads agree, int16 when they fit."""
    if positions.shape[1] > 1 and bool((positions == positions[:, :1]).all()):
        positions = positions[:, :1]
    small = positions.numel() == 0 or int(positions.max()) <= INT16_MAX
    return positions.to(torch.int16 if small else torch.int32).contiguous()


def join_positions(old: Tensor, new: Tensor) -> Tensor:
    heads = max(old.shape[1], new.shape[1])
    both = torch.cat([old.to(torch.int32).expand(-1, heads, -1), new.to(torch.int32)], dim=2)
    return compact_positions(both)
