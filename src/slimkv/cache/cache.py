"""The KV cache of one sequence: a :class:`~slimkv.cache.CacheLayer` per model layer, its compressor
state, and what every report needs.

Contract: the engine creates a :class:`SlimCache` per request (``SlimCache(spec)``), runs forward
passes that fill it through the attention function, lets a compressor shrink it (a quantizer replaces
layers by coded ones), and reads :meth:`SlimCache.stats`. Requests never share a cache: a running
batch is a list of caches, so a request joins or leaves a batch without copying anyone's entries,
and its bytes are its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .layer import KVLayer
from .protocol import CacheLayer
from .state import LayerStates, StateKey


@dataclass(frozen=True)
class CacheStats:
    """KV size of one sequence's cache.

    tokens_full: tokens whose KV an uncompressed cache would hold (every processed token)
    tokens_kept: entries actually held, averaged over layers and KV heads (rounded)
    bytes_full:  bytes an uncompressed cache of the model's dtype holds for ``tokens_full`` tokens
    bytes_kept:  every byte the cache holds: keys, values, positions, free slots, compressor state
    """

    tokens_full: int
    tokens_kept: int
    bytes_full: int
    bytes_kept: int

    @property
    def saved_fraction(self) -> float:
        return 0.0 if self.bytes_full == 0 else 1.0 - self.bytes_kept / self.bytes_full


@dataclass(frozen=True)
class CacheMark:
    """Where a cache stood: per layer the entries of every row (``[batch, kv_heads]``), and ``seen``."""

    lengths: tuple[Tensor | None, ...]
    seen: int


@dataclass(frozen=True)
class CacheSpec:
    """Shape facts of a model's KV cache.

    layers: number of attention layers; kv_heads: KV heads per layer; head_dim: entries per key
    dtype: dtype of keys and values
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values one token adds to an uncompressed cache (all layers)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * element

    def dense_bytes(self, tokens: int, entry_states: int = 0) -> int:
        """Bytes a dense cache holding ``tokens`` entries per row takes: keys, values, int32 positions,
        ``entry_states`` float32 values per entry and the row counts."""
        rows = self.layers * self.kv_heads
        element = torch.empty((), dtype=self.dtype).element_size()
        return rows * (tokens * (2 * self.head_dim * element + 4 + 4 * entry_states) + 8)


class SlimCache:
    """Per-layer KV storage of one sequence.

    seen: tokens processed so far, which is also the position of the next token (positions never
    shift when entries are evicted)
    states: per layer, the compressor state recorded for this sequence (``cache/state.py``)
    """

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.layers: list[CacheLayer] = [KVLayer() for _ in range(spec.layers)]
        self.states: list[LayerStates] = [LayerStates() for _ in range(spec.layers)]
        self.seen = 0

    def nbytes(self) -> int:
        """Every byte held: every layer's entries and free slots, and the compressor state."""
        return sum(layer.nbytes() for layer in self.layers) + sum(s.nbytes() for s in self.states)

    def stats(self) -> CacheStats:
        rows = self.spec.layers * self.spec.kv_heads
        kept = sum(layer.entries() for layer in self.layers)
        return CacheStats(
            tokens_full=self.seen,
            tokens_kept=round(kept / rows) if rows else 0,
            bytes_full=self.seen * self.spec.bytes_per_token,
            bytes_kept=self.nbytes(),
        )

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more entries in every layer (exact: a prompt about to be prefilled)."""
        for layer in self.layers:
            layer.reserve(layer.max_length + tokens)

    def growth_bytes(self, tokens: int, caps: list[int | None] | None = None) -> int:
        """Bytes the layers would allocate to take ``tokens`` more entries per row (see ``CacheLayer``).

        caps: per layer, the decode budget a row never grows past (None: no budget)
        A cache not yet allocated counts the exact room for those tokens.
        """
        if not self.layers[0].initialized:
            return self.spec.dense_bytes(tokens)
        caps = caps or [None] * len(self.layers)
        return sum(layer.growth_bytes(tokens, cap) for layer, cap in zip(self.layers, caps))

    def retain_states(self, layer_idx: int, keys: Iterable[StateKey]) -> None:
        """Free the compressor state of layer ``layer_idx`` but what ``keys`` own."""
        keys = set(keys)
        self.states[layer_idx].retain(keys)
        self.layers[layer_idx].retain_entry_states(keys)

    def clone(self) -> SlimCache:
        """An independent copy (every layer and state cloned; free slots dropped)."""
        out = SlimCache(self.spec)
        out.layers = [layer.clone() for layer in self.layers]
        out.states = [s.clone() for s in self.states]
        out.seen = self.seen
        return out

    def mark(self) -> CacheMark:
        """Remember where the cache stands, to :meth:`rollback` to it after speculative appends."""
        return CacheMark(
            lengths=tuple(None if layer.lengths is None else layer.lengths.clone() for layer in self.layers),
            seen=self.seen,
        )

    def rollback(self, mark: CacheMark, keep: int = 0, select: list[int] | None = None) -> None:
        """Drop what was appended since ``mark`` except the first ``keep`` tokens.

        select: instead of the first ``keep``, the appended tokens at these increasing offsets (the
                accepted path of a verified token tree; ``keep`` must equal its length)
        Valid only when every layer was only appended to since the mark (see ``CacheLayer.truncate``).
        Afterwards the cache is, entry for entry, the one at the mark plus those ``keep`` tokens.
        """
        if select is not None and len(select) != keep:
            raise ValueError(f"select names {len(select)} tokens, keep is {keep}")
        contiguous = select is None or list(select) == list(range(keep))
        for layer, lengths in zip(self.layers, mark.lengths):
            if lengths is None:
                continue
            if contiguous:
                layer.truncate(lengths + keep)
            else:
                layer.select_tail(lengths, torch.tensor(select, dtype=torch.long))
        self.seen = mark.seen + keep
