"""The KV cache slimkv owns: one :class:`KVLayer` per model layer plus what every report needs.

Contract: the engine creates a :class:`SlimCache` for a model (``SlimCache.for_model``), runs forward
passes that fill it through the attention function, lets a compressor shrink it, and reads
:meth:`SlimCache.stats`. Sequences prefilled separately are merged for batched decoding with
:meth:`SlimCache.stack`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layer import KVLayer
from .quantized import QuantizedLayer
from .ragged import RaggedLayer


@dataclass(frozen=True)
class CacheStats:
    """KV size of a cache, summed over its sequences.

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
    seen: tuple[int, ...]


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


class SlimCache:
    """Per-layer KV storage for a batch of sequences.

    seen: per sequence, the number of tokens processed so far, which is also the position of the
    next token (positions never shift when entries are evicted).
    """

    def __init__(self, spec: CacheSpec, batch: int = 1) -> None:
        self.spec = spec
        self.layers: list[KVLayer | RaggedLayer | QuantizedLayer] = [KVLayer() for _ in range(spec.layers)]
        self.seen = [0] * batch

    @property
    def batch(self) -> int:
        return len(self.seen)

    def stats(self) -> CacheStats:
        tokens_full = sum(self.seen)
        rows = self.spec.layers * self.spec.kv_heads
        kept = sum(layer.entries() for layer in self.layers)
        return CacheStats(
            tokens_full=tokens_full,
            tokens_kept=round(kept / rows) if rows else 0,
            bytes_full=tokens_full * self.spec.bytes_per_token,
            bytes_kept=sum(layer.nbytes() for layer in self.layers),
        )

    def clone(self) -> SlimCache:
        """An independent copy (every layer cloned; free slots dropped)."""
        out = SlimCache(self.spec, batch=0)
        out.layers = [layer.clone() for layer in self.layers]
        out.seen = list(self.seen)
        return out

    def mark(self) -> CacheMark:
        """Remember where the cache stands, to :meth:`rollback` to it after speculative appends."""
        return CacheMark(
            lengths=tuple(None if layer.lengths is None else layer.lengths.clone() for layer in self.layers),
            seen=tuple(self.seen),
        )

    def rollback(self, mark: CacheMark, keep: int = 0, select: list[int] | None = None) -> None:
        """Drop what was appended since ``mark`` except the first ``keep`` tokens of every sequence.

        select: instead of the first ``keep``, the appended tokens at these increasing offsets (the
                accepted path of a verified token tree; ``keep`` must equal its length)
        Valid only when every layer was only appended to since the mark (see ``KVLayer.truncate``).
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
            elif not hasattr(layer, "select_tail"):
                raise ValueError(f"{type(layer).__name__} cannot keep a token tree's path; verify over a full cache")
            else:
                layer.select_tail(lengths, torch.tensor(select, dtype=torch.long))
        self.seen = [n + keep for n in mark.seen]

    @classmethod
    def stack(cls, caches: list[SlimCache]) -> SlimCache:
        """One batched cache from several caches (each may hold one or more sequences)."""
        if not caches:
            raise ValueError("stack needs at least one cache")
        out = cls(caches[0].spec, batch=0)
        out.layers = [_stack_layers([c.layers[i] for c in caches]) for i in range(out.spec.layers)]
        out.seen = [n for c in caches for n in c.seen]
        return out


def _stack_layers(layers: list) -> KVLayer | QuantizedLayer:
    kinds = {type(layer) for layer in layers}
    if kinds == {KVLayer, RaggedLayer}:  # some sequences kept head-wise budgets: the batch is ragged
        return RaggedLayer.stack(layers)
    if len(kinds) > 1:
        raise ValueError("cannot decode quantized and full-precision caches in one batch; use one compressor")
    return kinds.pop().stack(layers)
