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

from ..cache import AttentionMeta, KVLayer, SlimCache, kernels
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
    def write(self, layer_idx: int, key: Tensor, value: Tensor, scale: float) -> None:
        """Put this pass's keys and values ``[1, H, T, D]`` into the row's layer (evicting if decoding at a budget)."""
        layer = self.cache.layers[layer_idx]
        layer.scale = scale
        comp = self.compressor
        room = cap = None
        if comp is not None and self.phase == "decode" and key.shape[2] == 1 and comp.active("decode"):
            cap = self._keep(comp, 1)[layer_idx]
            room = comp.make_room(layer, self.context(layer_idx, 1, comp), cap)
        if room is not None:
            layer.replace(room, key, value, self.positions, cap=cap)
        else:
            layer.append(key, value, self.positions, exact=self.phase == "prefill", cap=cap)

    def fusable(self, layer_idx: int, softcap: float | None, sliding_window: int | None) -> bool:
        """True when the batch's dense decode kernel can read this row's layer for this pass."""
        return (type(self.cache.layers[layer_idx]) is KVLayer and self.tree is None and not self._key_mass
                and softcap is None and sliding_window is None)

    def read(self, layer_idx: int, query: Tensor, scale: float, sliding_window: int | None,
             softcap: float | None) -> tuple[Tensor, Tensor | None]:
        """Attention of this pass's queries ``[1, Hq, T, D]`` over the row's layer (after :meth:`write`)."""
        meta = AttentionMeta(self.positions, query.shape[2], scale, sliding_window, softcap, self._key_mass,
                             self.tree, self._mask_cache)
        return self.cache.layers[layer_idx].attend(query, meta)

    def record(self, layer_idx: int, query: Tensor, mass: Tensor | None) -> None:
        """Let the row's recorders observe this pass (never on a quantized layer: nothing is evicted there)."""
        layer = self.cache.layers[layer_idx]
        if layer.quantized:
            return
        for recorder in self._watching:
            recorder.observe(layer, self.context(layer_idx, query.shape[2], recorder), query, self.positions, mass)

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
               sliding_window: int | None, softcap: float | None) -> Tensor:
        """write, read and record: query [1, Hq, T, D], key/value [1, H, T, D] -> output [1, Hq, T, D]."""
        self.write(layer_idx, key, value, scale)
        out, mass = self.read(layer_idx, query, scale, sliding_window, softcap)
        self.record(layer_idx, query, mass)
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
    """A forward pass over several rows (the attention sink ``models/adapter.py`` calls per layer).

    Decoding (one token per row), the rows whose layer is dense are read by one kernel call for the
    whole batch (``cache/kernels``); every other row attends on its own.
    """

    def __init__(self, rows: list[RowPass]) -> None:
        if not rows:
            raise ValueError("a pass needs at least one row")
        self.rows = rows

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
               sliding_window: int | None, softcap: float | None) -> Tensor:
        """query [B, Hq, T, D], key/value [B, H, T, D] -> output [B, T, Hq, D]."""
        rows = self.rows
        if query.shape[2] != 1 or not kernels.dense_available(query, key.dtype, query.shape[1] // key.shape[1]):
            if len(rows) == 1:
                return rows[0].attend(layer_idx, query, key, value, scale, sliding_window, softcap).transpose(1, 2)
            return torch.cat([row.attend(layer_idx, query[b : b + 1], key[b : b + 1], value[b : b + 1], scale,
                                         sliding_window, softcap) for b, row in enumerate(rows)]).transpose(1, 2)
        for b, row in enumerate(rows):
            row.write(layer_idx, key[b : b + 1], value[b : b + 1], scale)
        fused = [b for b, row in enumerate(rows) if row.fusable(layer_idx, softcap, sliding_window)]
        out = query.new_empty(query.shape)
        if fused:
            layers = [rows[b].cache.layers[layer_idx] for b in fused]
            lengths = [n for layer in layers for n in layer.host_lengths()]
            read = kernels.dense_decode(query if len(fused) == len(rows) else query[fused],
                                        [layer.keys for layer in layers], [layer.values for layer in layers],  # type: ignore[attr-defined]
                                        lengths, scale)
            if len(fused) == len(rows):
                out = read
            else:
                out[fused] = read
        done = set(fused)
        for b, row in enumerate(rows):
            mass = None
            if b not in done:
                out[b : b + 1], mass = row.read(layer_idx, query[b : b + 1], scale, sliding_window, softcap)
            row.record(layer_idx, query[b : b + 1], mass)
        return out.transpose(1, 2)
