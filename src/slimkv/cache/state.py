"""Compressor state held by a sequence's cache: typed objects, each with one owner.

A compression method may need to remember something between forward passes: SnapKV the queries of
its observation window, H2O the attention every entry received, FastGen each head's policy. That
state belongs to one sequence (it is stored in that sequence's :class:`~slimkv.cache.SlimCache`, so
it joins, leaves, is parked and cloned with it) and to one *owner*, named by a :data:`StateKey`:
the class that records it and the settings that change what it records
(``Compressor.state_key``). Methods that record the same thing the same way share one key and one
record (SnapKV, PyramidKV and AdaKV all read one observation window); methods that record
differently never see each other's state.

Two kinds of state:

- :class:`CompressorState` objects, one per owner and layer, in the cache's :class:`LayerStates`
  (a query window, query statistics, per-head policies); each is a small dataclass of tensors;
- per-entry values (a float per kept entry, such as H2O's accumulated attention) live in the layer
  itself, beside the keys (``CacheLayer.entry_state``), because they must move with the entries when
  a compressor keeps, replaces or repacks them.

Both count in the cache's ``bytes_kept``. After a compression the engine keeps only the states its
compressor still needs while decoding (``Compressor.kept_states``) and frees the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TypeVar

from torch import Tensor

#: Who owns a state: the recording class's name followed by the settings that change what it records.
StateKey = tuple

S = TypeVar("S", bound="CompressorState")


class CompressorState:
    """Base class of a compressor's per-layer state: a dataclass whose tensor fields are its bytes."""

    def tensors(self) -> list[Tensor]:
        out = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out.append(value)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self: S) -> S:
        changes = {f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)  # type: ignore[arg-type]
                   if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


class LayerStates:
    """The compressor states of one layer of one sequence, by owner."""

    def __init__(self) -> None:
        self._items: dict[StateKey, CompressorState] = {}

    def get(self, key: StateKey, kind: type[S]) -> S | None:
        """The state ``key`` owns, or None; it must be a ``kind``."""
        state = self._items.get(key)
        if state is not None and not isinstance(state, kind):
            raise TypeError(f"state {key} is a {type(state).__name__}, not a {kind.__name__}")
        return state

    def setdefault(self, key: StateKey, factory: Callable[[], S]) -> S:
        """The state ``key`` owns, created by ``factory`` the first time."""
        state = self._items.get(key)
        if state is None:
            state = self._items[key] = factory()
        return state  # type: ignore[return-value]

    def retain(self, keys: Iterable[StateKey]) -> None:
        """Free every state but those of ``keys``."""
        keep = set(keys)
        self._items = {k: v for k, v in self._items.items() if k in keep}

    def keys(self) -> list[StateKey]:
        return list(self._items)

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self._items.values())

    def clone(self) -> LayerStates:
        out = LayerStates()
        out._items = {k: v.clone() for k, v in self._items.items()}
        return out

    def __len__(self) -> int:
        return len(self._items)
