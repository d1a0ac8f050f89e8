"""The one interface every cache layout implements: what the engine and compressors may call on a layer.

Layouts (one class each, all subclasses of :class:`CacheLayer`):

- :class:`~slimkv.cache.KVLayer`: dense rows ``[batch, kv_heads, capacity, head_dim]``;
- :class:`~slimkv.cache.RaggedLayer`: rows of different lengths in fixed-size pages (head-wise budgets);
- :class:`~slimkv.cache.QuantizedLayer` (KIVI codes), :class:`~slimkv.cache.vq.VQLayer` (CommVQ codes),
  :class:`~slimkv.cache.mixed.MixedLayer` (two bit widths): coded entries plus a dense residual.

Contract (who calls what, in which order):

1. The engine creates a dense layer per model layer of a sequence's cache and may ``reserve`` room
   for a prompt it is about to prefill; ``growth_bytes`` tells the scheduler, before a pass, how many
   bytes the layer would allocate to take ``tokens`` more entries (the KV pool's admission check).
2. Every forward pass calls ``append`` (or, decoding at a budget, ``replace``) with the new keys and
   values, then ``attend`` with the new queries and the pass's :class:`~slimkv.cache.AttentionMeta`.
3. Compressors read ``view``/``positions``/``valid_mask`` and shrink the layer with ``keep``; a
   quantizer replaces the whole layer by a coded one. Per-entry compressor values (``entry_state``)
   move with the entries.
4. Speculative decoding rolls back with ``truncate`` (and ``select_tail`` for a token tree's path).
5. Reports read ``entries`` and ``nbytes`` (every byte held, free slots included).

Shapes: a layer holds ``batch`` rows per KV head (one sequence: batch 1); ``lengths`` [batch,
kv_heads] counts each row's entries, which are unordered inside a row: attention masks by
*position*, never by slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from .attention import AttentionMeta
    from .state import StateKey


@dataclass(frozen=True)
class Room:
    """Where a decode step writes every row's new entry: over its evicted slot where the row is full,
    after its last entry elsewhere (``Compressor.make_room`` decides).

    slots: [batch, kv_heads] int64, the evicted slot (read only where ``full``)
    full:  [batch, kv_heads] bool on the layer's device
    host_full: the same flags on the host, row-major, when the compressor knows them without reading
               the device (None: ``replace`` reads ``full``)
    """

    slots: Tensor
    full: Tensor
    host_full: list[bool] | None = None

    def full_rows(self) -> list[bool]:
        return self.host_full if self.host_full is not None else [bool(f) for f in self.full.flatten().tolist()]


class CacheLayer(ABC):
    """One attention layer's KV entries (see the module docstring for the contract)."""

    #: entries are stored as codes: no eviction (``keep``/``replace`` refuse) and no per-entry state
    quantized: ClassVar[bool] = False

    lengths: Tensor | None  # [batch, kv_heads] int64, entries of every row
    scale: float  # softmax scale of the attention reading this layer (set by the engine)

    # ------------------------------------------------------------------ shape and size
    @property
    @abstractmethod
    def initialized(self) -> bool:
        """True once the layer holds (or has room for) entries."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Largest number of entries in any row: the width of ``view()``."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Entries the widest row can hold without allocating."""

    @property
    @abstractmethod
    def uniform(self) -> bool:
        """True when every row holds ``max_length`` entries (no free slot inside the view)."""

    @property
    @abstractmethod
    def positions(self) -> Tensor:
        """``[batch, kv_heads, max_length]`` original token position of every slot of the view."""

    def host_lengths(self) -> list[int]:
        """Entries of every row, row-major, read on the host (the dense and paged layers mirror them)."""
        assert self.lengths is not None
        return [int(n) for n in self.lengths.flatten().tolist()]

    @abstractmethod
    def entries(self) -> int:
        """Entries held, summed over rows."""

    @abstractmethod
    def nbytes(self) -> int:
        """Every byte the layer holds: entries, positions, free slots, per-entry state."""

    @abstractmethod
    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values ``[batch, kv_heads, L, head_dim]`` and positions ``[batch, kv_heads, L]``."""

    @abstractmethod
    def valid_mask(self) -> Tensor:
        """``[batch, kv_heads, L]`` bool: which slots of the view hold entries."""

    # ------------------------------------------------------------------ growth
    @abstractmethod
    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` entries per row ahead of appends (exact, no slack)."""

    @abstractmethod
    def growth_bytes(self, tokens: int, cap: int | None = None) -> int:
        """Bytes ``append`` of ``tokens`` entries per row would allocate (``cap``: as ``append``)."""

    # ------------------------------------------------------------------ writing
    @abstractmethod
    def append(self, keys: Tensor, values: Tensor, positions: Tensor, exact: bool = False,
               cap: int | None = None) -> None:
        """Add entries: keys/values ``[batch, kv_heads, T, head_dim]``, positions ``[batch, T]``.

        exact: grow to exactly the room needed (prefill) rather than by a block
        cap:   the most entries a row will ever hold (a decode budget): growth stops there
        """

    def replace(self, room: Room, keys: Tensor, values: Tensor, positions: Tensor, cap: int | None = None) -> None:
        """Decode-phase write of one token per row (keys/values ``[batch, kv_heads, 1, head_dim]``,
        positions ``[batch, 1]``): over the evicted slot of full rows, appended to the others."""
        raise RuntimeError(f"a {type(self).__name__} does not evict entries one at a time; "
                           "evict before quantizing")

    def keep(self, indices: Tensor, lengths: Tensor | None = None) -> None:
        """Keep the entries at ``indices`` [batch, kv_heads, k] (rows keep their first ``lengths``)."""
        raise RuntimeError(f"a {type(self).__name__} does not evict entries; evict before quantizing")

    @abstractmethod
    def truncate(self, lengths: Tensor) -> None:
        """Forget entries appended since rows held ``lengths`` [batch, kv_heads] (speculative rollback)."""

    def select_tail(self, lengths: Tensor, index: Tensor) -> None:
        """Of the entries appended since rows held ``lengths``, keep those at offsets ``index`` [n]."""
        raise ValueError(f"a {type(self).__name__} cannot keep a token tree's path; verify over a full cache")

    # ------------------------------------------------------------------ per-entry compressor state
    def entry_state(self, key: StateKey, fill: float = 0.0) -> Tensor:
        """A float32 value per entry owned by ``key``, created with ``fill``; it moves with the entries."""
        raise RuntimeError(f"a {type(self).__name__} keeps no per-entry compressor state")

    def get_entry_state(self, key: StateKey) -> Tensor | None:
        """The per-entry state ``key`` owns, or None when it was never created."""
        return None

    def retain_entry_states(self, keys: Iterable[StateKey]) -> None:
        """Free every per-entry state but those of ``keys``."""

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def attend(self, query: Tensor, meta: AttentionMeta) -> tuple[Tensor, Tensor | None]:
        """Attention of new queries ``[batch, q_heads, T, head_dim]`` over the layer (after ``append``).

        Returns the output ``[batch, q_heads, T, head_dim]`` and, when ``meta.key_mass``, the attention
        mass every slot received ``[batch, kv_heads, L]`` (summed over the queries of its group).
        """

    @abstractmethod
    def clone(self) -> CacheLayer:
        """An independent copy (free slots dropped)."""
