"""One forward pass over the rows of a batch: where the attention function, the caches and the
compressors meet.

Every row is one sequence with its own :class:`~slimkv.cache.SlimCache` and its own compressor: a
batch is a list of caches, never one stacked tensor, so sequences of any layout and length join and
leave between passes. For every attention layer of a pass, :meth:`BatchPass.attend` (called from
the attention function in ``models/adapter.py``) splits the new queries, keys and values by row and
for each row, in order:

1. decode phase, one new token, a compressor acting while decoding: ask it for room
   (``make_room``) and write the token over the evicted entry of full rows; otherwise append;
2. attend over the row's entries (explicitly, with per-entry attention mass, only when an observer
   needs it);
3. let the row's observers record what they need: their ``recorders``, each state key once per pass,
   never on a quantized layer.

The engine calls :meth:`RowPass.compress` after a segment that must be compressed; it then frees the
compressor state no longer needed. Per-layer work reads row counts and budgets on the host, so a
decode step does not wait for the device layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..cache import AttentionMeta, SlimCache
from ..compressors import Compressor, ScoreContext

#: The bound data of a compressor for the model of the pass (``Bindings.get``).
BoundLookup = Callable[[Compressor], Any]


def _unbound(comp: Compressor) -> Any:
    return None


def keep_table(comp: Compressor, seen: int, layers: int) -> list[int]:
    """Entries every layer keeps under ``comp`` after ``seen`` tokens, read on the host."""
    total = torch.tensor([seen], dtype=torch.long)
    return torch.cat([comp.keep_for(total, i, layers) for i in range(layers)]).tolist()


@dataclass
class RowPass:
    """One sequence's part of a forward pass.

    cache: the sequence's cache the new tokens go into
    positions: [1, T] original positions of the new tokens
    compressor: the sequence's method, or None for the full cache
    phase: "prefill" (prompt segments) or "decode" (generated tokens)
    observers: methods that record what they need during this pass (default: the compressor).
               Several observers let one prefill serve several methods (compress once per method,
               prefill once per prompt); observers recording alike (same state key) record once.
    punctuation: [1, T] bool, which new tokens are punctuation (for observers with
                 ``needs_punctuation``; None when none needs it)
    tree: [T, T] bool, which of this pass's tokens each one sees, for verifying a token tree
          (``speculative/tree.py``); None = causal by position
    bound: the bound data of a compressor (``Engine.bind``)
    """

    cache: SlimCache
    positions: Tensor
    compressor: Compressor | None = None
    phase: Literal["prefill", "decode"] = "prefill"
    observers: tuple[Compressor, ...] | None = None
    punctuation: Tensor | None = None
    tree: Tensor | None = None
    bound: BoundLookup = _unbound
    _watching: tuple[Compressor, ...] = field(init=False, repr=False)
    _keeps: dict[tuple[int, int], list[int]] = field(init=False, repr=False, default_factory=dict)
    _bounds: dict[int, Any] = field(init=False, repr=False, default_factory=dict)
    _mask_cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        observers = self.observers if self.observers is not None else (
            (self.compressor,) if self.compressor is not None else ())
        watching: dict[tuple, Compressor] = {}
        for o in observers:  # one recorder per state key: methods recording alike share a record
            for r in o.recorders(self.phase):
                watching.setdefault(r.state_key, r)
        self._watching = tuple(watching.values())
        self._key_mass = any(o.needs_key_mass for o in self._watching)

    @property
    def tokens(self) -> int:
        return self.positions.shape[1]

    # ------------------------------------------------------------------ budgets, read on the host
    def _keep(self, comp: Compressor, extra: int) -> list[int]:
        """Entries per layer ``comp`` keeps for ``seen + extra`` tokens (computed once per pass)."""
        key = (id(comp), extra)
        table = self._keeps.get(key)
        if table is None:
            table = self._keeps[key] = keep_table(comp, self.cache.seen + extra, len(self.cache.layers))
        return table

    def context(self, layer_idx: int, extra: int, comp: Compressor) -> ScoreContext:
        """What ``comp`` knows acting on layer ``layer_idx`` with ``extra`` tokens beyond ``cache.seen``."""
        return ScoreContext(
            layer_idx=layer_idx, num_layers=len(self.cache.layers),
            keep=torch.tensor([self._keep(comp, extra)[layer_idx]]),
            seen=torch.tensor([self.cache.seen + extra]), phase=self.phase,
            states=self.cache.states[layer_idx], punctuation=self.punctuation, bound=self._bound_of(comp),
        )

    def _bound_of(self, comp: Compressor) -> Any:
        if id(comp) not in self._bounds:
            self._bounds[id(comp)] = self.bound(comp)
        return self._bounds[id(comp)]

    # ------------------------------------------------------------------ one layer
    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
               sliding_window: int | None, softcap: float | None) -> Tensor:
        """query [1, Hq, T, D], key/value [1, H, T, D] -> output [1, Hq, T, D]."""
        layer = self.cache.layers[layer_idx]
        layer.scale = scale
        tokens = key.shape[2]
        comp = self.compressor
        room = cap = None
        if comp is not None and self.phase == "decode" and tokens == 1 and comp.active("decode"):
            cap = self._keep(comp, 1)[layer_idx]
            room = comp.make_room(layer, self.context(layer_idx, 1, comp), cap)
        if room is not None:
            layer.replace(room, key, value, self.positions, cap=cap)
        else:
            layer.append(key, value, self.positions, exact=self.phase == "prefill", cap=cap)
        meta = AttentionMeta(self.positions, tokens, scale, sliding_window, softcap, self._key_mass, self.tree,
                             self._mask_cache)
        out, mass = layer.attend(query, meta)
        if not layer.quantized:  # nothing is evicted from a quantized layer: nothing to watch
            for recorder in self._watching:
                recorder.observe(layer, self.context(layer_idx, tokens, recorder), query, self.positions, mass)
        return out

    def compress(self) -> None:
        """Shrink every layer to the compressor's target for the tokens seen so far, then free the
        compressor state it no longer needs (``Compressor.kept_states``)."""
        comp = self.compressor
        if comp is None or not comp.compresses:
            return
        kept = comp.kept_states()
        for i, layer in enumerate(self.cache.layers):
            out = comp.compress(layer, self.context(i, 0, comp))
            if out is not None:  # a quantizer or a head-wise method hands back the layer replacing this one
                self.cache.layers[i] = out
            self.cache.retain_states(i, kept)


class BatchPass:
    """A forward pass over several rows (the attention sink ``models/adapter.py`` calls per layer)."""

    def __init__(self, rows: list[RowPass]) -> None:
        if not rows:
            raise ValueError("a pass needs at least one row")
        self.rows = rows

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
               sliding_window: int | None, softcap: float | None) -> Tensor:
        """query [B, Hq, T, D], key/value [B, H, T, D] -> output [B, T, Hq, D]."""
        if len(self.rows) == 1:
            out = self.rows[0].attend(layer_idx, query, key, value, scale, sliding_window, softcap)
        else:
            out = torch.cat([row.attend(layer_idx, query[b : b + 1], key[b : b + 1], value[b : b + 1], scale,
                                        sliding_window, softcap) for b, row in enumerate(self.rows)])
        return out.transpose(1, 2)
