"""The compressor interface: a method is a small dataclass that overrides :meth:`Compressor.score`.

A compressor is configuration only (frozen in use: the engine shares one object between concurrent
requests). What it learns about a model is *bound* data, and what it records about a request is
*state* kept in that request's cache.

Contract (who calls what, in which order; the engine drives it, see ``engine/forward.py``):

0. ``bind(model)`` - once per model, when a request with this compressor is submitted (or ahead of
   time: ``Engine.bind``). Methods that need something of the model itself (TriAttention's calibrated
   query centres, KIVI's wide-key layers, CommVQ's codebooks) load or measure it and *return* it; the
   engine keeps it and hands it back in every :class:`ScoreContext` (``ctx.bound``). Others return None.
1. ``observe(layer, ctx, query, key_mass)`` - during every forward pass in an active phase, right
   after the layer's attention (never on a quantized layer). Methods that need queries (SnapKV's
   observation window) or attention mass (H2O) record them in the request's state, under their
   :attr:`Compressor.state_key`: ``ctx.states`` (typed objects, ``cache/state.py``) or
   ``layer.entry_state`` (a value per entry). The engine calls the ``recorders`` of a request's
   methods, each state key once per pass, so methods recording alike share one record.
   ``key_mass`` is passed only to methods with ``needs_key_mass = True``; it costs an explicit
   attention computation.
2. ``compress(layer, ctx)`` - after a prefill segment (prefill phase) or after a multi-token pass in
   the decode phase: ``select`` the ``ctx.keep`` highest-scored entries of every row, let ``merge``
   fold the others into the kept ones (merging methods; eviction methods drop them), then free them.
   It may return a layer object that replaces ``layer`` in the cache (quantizers return a
   :class:`~slimkv.cache.QuantizedLayer`); eviction methods shrink the layer in place and return None.
   A pipeline passes its merging stage as ``merger``: the eviction stage chooses, the merger folds.
   The engine then frees every state but :meth:`Compressor.kept_states`.
3. ``make_room(layer, ctx)`` - decode phase, before one new token is written: for rows at their
   budget, pick the entry to evict (the lowest score); the new token takes its slot.

``score(layer, ctx) -> [batch, kv_heads, L]`` (higher = keep) is the one method an eviction method
overrides; a merging method (``merging/``) overrides ``merge`` as well.
Scores of free slots are ignored. Budgets: ``ratio`` is the fraction of entries *removed* (kvpress's
convention: 0.75 keeps a quarter) relative to every token seen; ``budget`` is a fixed number of entries
kept per layer and KV head. ``allocation="head"`` spends a layer's budget across its KV heads by
score instead of giving each head the same share (AdaKV, ``allocation.py``); the layer then becomes a
paged :class:`~slimkv.cache.RaggedLayer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from ..cache import CacheLayer, LayerStates, RaggedLayer, Room, StateKey
from ..cache.ragged import pages_pay
from ..errors import ConfigError
from .allocation import allocate_heads, check_allocation
from .schedules import check_schedule, layer_keep

if TYPE_CHECKING:
    from ..cache import SlimCache
    from ..models.adapter import ModelAdapter

#: When a method acts: on the prompt, on every generated token, or both.
Phase = Literal["prefill", "decode", "both"]


class QueryWatcher(Protocol):
    """Called with every layer's queries of a pass (what calibrating query statistics needs)."""

    def __call__(self, layer_idx: int, query: Tensor, positions: Tensor) -> None:
        """query: [1, q_heads, T, head_dim] (RoPE applied); positions: [1, T]."""


class ModelAccess(Protocol):
    """What binding a method to a model may use (the engine's ``ModelRunner`` provides it)."""

    adapter: ModelAdapter
    tokenizer: Any
    prefill_chunk: int

    def new_cache(self) -> SlimCache: ...

    def prefill(self, cache: SlimCache, ids: list[int]) -> Tensor:
        """Feed ``ids`` to a full (uncompressed) cache; last logits [1, vocab]."""
        ...

    def extend(self, cache: SlimCache, ids: list[int], all_logits: bool = False,
               watch: QueryWatcher | None = None) -> Tensor:
        """One forward pass appending ``ids`` to ``cache`` (no compressor); logits [1, T or 1, vocab]."""
        ...


PHASES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class ScoreContext:
    """What a compressor knows about the layer it acts on.

    layer_idx: index of the layer; num_layers: layers in the model
    keep: [batch] entries each row of this layer should hold after the operation
    seen: [batch] tokens processed per sequence, counting a token about to be added
    phase: "prefill" or "decode"
    states: this layer's compressor states of the sequence (``cache/state.py``)
    punctuation: [batch, tokens] bool, which new tokens of this pass are punctuation; given to
                 observers with ``needs_punctuation`` by the engine's prefill and generation loop
                 (None otherwise)
    bound: what ``bind`` returned for this compressor and model (None if it needs nothing)
    """

    layer_idx: int
    num_layers: int
    keep: Tensor
    seen: Tensor
    phase: str
    states: LayerStates = dataclasses.field(default_factory=LayerStates)
    punctuation: Tensor | None = None
    bound: Any = None


@dataclass
class Compressor:
    """Base class of every KV cache compression method.

    ratio:  fraction of KV entries removed, in [0, 1); kvpress's convention
    budget: entries kept per layer and KV head (instead of a ratio); with a non-uniform schedule,
            the mean over layers
    phase:  "prefill", "decode" or "both"; None picks the method's ``default_phase``
    schedule: how the budget is spread over layers: "uniform" or "pyramid" (``schedules.py``)
    beta:   steepness of the pyramid: the last layer keeps 1/beta of the mean budget
    allocation: how a layer's budget is spread over its KV heads: "uniform" (the same for every head)
            or "head" (AdaKV: by score over all heads of the layer; prefill phase only; ``allocation.py``)
    floor:  with allocation="head", the share of its uniform budget every head keeps at least
    """

    ratio: float | None = None
    budget: int | None = None
    phase: Phase | None = None
    schedule: str = "uniform"
    beta: float = 20.0
    allocation: str = "uniform"
    floor: float = 0.2

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "eviction"
    paper: ClassVar[str] = ""
    supported_phases: ClassVar[tuple[str, ...]] = ("prefill",)
    default_phase: ClassVar[str] = "prefill"
    needs_key_mass: ClassVar[bool] = False
    needs_punctuation: ClassVar[bool] = False  # observe() reads ctx.punctuation (FastGen)
    decodes_per_head: ClassVar[bool] = False  # make_room follows per-head rules (FastGen): head-wise allocation may decode
    #: settings that change what ``observe`` records (they name its state with the recording class)
    state_fields: ClassVar[tuple[str, ...]] = ()
    #: the recorded state is still needed while decoding (ALISA's latest queries, H2O's accumulated
    #: mass, FastGen's per-head policies); otherwise it is freed once the prompt is compressed
    decode_state: ClassVar[bool] = False
    excludes: ClassVar[bool] = False  # score() gives -inf to entries never kept, even under budget
    quantizes: ClassVar[bool] = False  # stores entries in fewer bits (see ``quantization/``)

    def __post_init__(self) -> None:
        if self.ratio is not None and self.budget is not None:
            raise ConfigError("give either a ratio or a budget, not both")
        if self.ratio is not None and not (0.0 <= float(self.ratio) < 1.0):
            raise ConfigError(
                f"ratio must be in [0, 1) (the fraction of KV entries removed), got {self.ratio}"
            )
        if self.budget is not None and (isinstance(self.budget, bool) or int(self.budget) != self.budget
                                        or self.budget < 1):
            raise ConfigError(f"budget must be a whole number of entries >= 1, got {self.budget}")
        check_schedule(self.schedule, self.beta)
        if self.phase is None:
            self.phase = self.default_phase
        check_allocation(self.allocation, self.floor, self.phase, self.decodes_per_head)
        if self.phase not in PHASES:
            raise ConfigError(f"phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        wanted = ("prefill", "decode") if self.phase == "both" else (self.phase,)
        unsupported = [p for p in wanted if p not in self.supported_phases]
        if unsupported:
            raise ConfigError(
                f"{self.name or type(self).__name__} does not support the {unsupported[0]} phase; "
                f"it supports: {', '.join(self.supported_phases)}"
            )

    # ------------------------------------------------------------------ configuration
    @property
    def compresses(self) -> bool:
        """False when nothing is ever removed (no ratio or budget, or ratio 0)."""
        return self.budget is not None or bool(self.ratio)

    def active(self, phase: str) -> bool:
        return self.compresses and self.phase in (phase, "both")

    def describe(self) -> str:
        amount = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio or 0}"
        layers = "" if self.schedule == "uniform" else f", schedule={self.schedule}"
        if self.allocation != "uniform":
            layers += f", allocation={self.allocation}, floor={self.floor}"
        return f"{self.name}({amount}, phase={self.phase}{layers})"

    def keep_for(self, seen: Tensor, layer_idx: int = 0, num_layers: int = 1) -> Tensor:
        """Entries layer ``layer_idx`` keeps per row for ``seen`` tokens processed ([batch] -> [batch])."""
        if self.budget is not None:
            kept = torch.clamp(seen, max=int(self.budget))
        else:
            kept = torch.clamp((seen.double() * (1.0 - float(self.ratio or 0.0))).long(), min=1)  # int(), as kvpress
        return layer_keep(kept, seen, layer_idx, num_layers, self.schedule, self.beta)

    def bind(self, model: ModelAccess) -> Any:
        """What this method needs of ``model`` (calibrations, RoPE tables), or None (the default).

        Called once per model and compressor by the engine (``Engine.bind``), which keeps the result
        and gives it back as ``ctx.bound``; a method never stores it on itself.
        """
        return None

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> StateKey:
        """Who owns what this method records: the class that defines its ``observe`` (its own class if
        it observes nothing) and the values of its ``state_fields``."""
        owner = next((k for k in type(self).__mro__ if "observe" in vars(k) and k is not Compressor), type(self))
        return (owner.__qualname__, *(getattr(self, f) for f in self.state_fields))

    def recorders(self, phase: str) -> list[Compressor]:
        """The methods whose ``observe`` the engine calls for this one in ``phase``: itself when it
        observes and acts in that phase; a composite names the parts that record (a pipeline's
        stages, the SnapKV votes KVMerger borrows). The engine calls each state key once per pass."""
        return [self] if self.active(phase) and type(self).observe is not Compressor.observe else []

    def kept_states(self) -> set[StateKey]:
        """State keys still needed after compression: the method's own when it also decodes."""
        return {self.state_key} if self.decode_state and self.active("decode") else set()

    def state_bytes(self, spec: Any, q_heads: int, tokens: int) -> int:
        """Most bytes the state recorded for one request of ``tokens`` tokens can hold (all layers).

        spec: the model's :class:`~slimkv.cache.CacheSpec`. The engine's KV pool reserves it on
        admission. Score-only methods record nothing (0).
        """
        return 0

    # ------------------------------------------------------------------ the one method to override
    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        """Importance of every slot of ``layer.view()``: ``[batch, kv_heads, L]``, higher = keep."""
        raise NotImplementedError

    def observe(self, layer: CacheLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        """Record what scoring will need (called after each attention in an active phase).

        query: [batch, q_heads, tokens, head_dim]; query_positions: [batch, tokens]
        key_mass: [batch, kv_heads, L] attention each slot received, if ``needs_key_mass``
        """

    def merge(self, layer: CacheLayer, ctx: ScoreContext, kept: Tensor, lengths: Tensor | None) -> None:
        """Fold the entries about to be freed into kept ones, in place (merging methods override this).

        kept:    [batch, kv_heads, k] slots each row keeps (the rest of ``layer.view()`` is freed next)
        lengths: None, or [batch, kv_heads] for ragged rows: a row keeps only its first ``lengths`` slots
        The default drops them (eviction).
        """

    # ------------------------------------------------------------------ driven by the engine
    def select(self, layer: CacheLayer, ctx: ScoreContext) -> tuple[Tensor, Tensor | None]:
        """The ``ctx.keep`` best slots of every row by ``score``: ``(kept [B, H, k], lengths or None)``.

        Call only when some row holds more than ``ctx.keep`` entries. For ragged rows ``lengths``
        [B, H] says how many of a row's ``kept`` slots are real (the rest repeat a slot, see ``KVLayer.keep``).
        """
        assert layer.lengths is not None
        keep = ctx.keep.to(layer.lengths.device)[:, None]  # [B, 1]
        scores = self.score(layer, ctx).float()
        if not layer.uniform:
            scores = scores.masked_fill(~layer.valid_mask(), float("-inf"))
        lengths = torch.minimum(layer.lengths, keep)  # [B, H]
        k = int(lengths.max())
        indices = scores.topk(k, dim=-1).indices  # [B, H, k], best first
        if not bool((lengths != k).any()):
            return indices, None
        # rows keep only their first `lengths` choices; the rest become free slots at the tail
        length = scores.shape[-1]
        rank = torch.arange(k, device=indices.device)
        indices = torch.where(rank < lengths[..., None], indices, length)
        return indices.sort(dim=-1).values.clamp(max=length - 1), lengths

    def compress(self, layer: CacheLayer, ctx: ScoreContext, merger: Compressor | None = None) -> CacheLayer | None:
        """Keep the ``ctx.keep`` best entries of every row; merge or free the rest (real bytes).

        merger: the method whose ``merge`` folds the freed entries into the kept ones (a pipeline's
                merging stage); default this method's own ``merge``
        Returns a layer that replaces ``layer`` (a :class:`RaggedLayer` after head-wise allocation) or None.
        """
        if not layer.initialized:
            return None
        if self.allocation == "head":
            return self._compress_heads(layer, ctx, merger)
        assert layer.lengths is not None
        if max(layer.host_lengths(), default=0) <= int(ctx.keep.max()):
            return None
        indices, lengths = self.select(layer, ctx)
        (merger or self).merge(layer, ctx, indices, lengths)
        layer.keep(indices, lengths)
        return None

    def _compress_heads(self, layer: CacheLayer, ctx: ScoreContext,
                        merger: Compressor | None = None) -> CacheLayer | None:
        """Keep ``kv_heads * ctx.keep`` entries per sequence, shared by score over the heads (AdaKV).

        Returns a :class:`RaggedLayer` replacing ``layer`` when heads end up with different counts.
        """
        assert layer.lengths is not None
        keep = ctx.keep.to(layer.lengths.device)  # [B]
        total = keep * layer.lengths.shape[1]
        if bool((layer.lengths.sum(dim=-1) <= total).all()) and not self.excludes:
            return None
        scores = self.score(layer, ctx).float().masked_fill(~layer.valid_mask(), float("-inf"))
        lengths, indices = allocate_heads(scores, total, (keep.double() * self.floor).long())
        if merger is not None or type(self).merge is not Compressor.merge:
            if isinstance(layer, RaggedLayer):
                raise ValueError("merging into a paged (ragged) layer is not supported; "
                                 "merge on the first compression")
            (merger or self).merge(layer, ctx, indices, lengths)
        layer.keep(indices, lengths)
        if isinstance(layer, RaggedLayer) or not pages_pay(lengths):
            return None  # (equal or nearly equal heads: padding costs less than pages)
        return RaggedLayer.from_layer(layer)

    def make_room(self, layer: CacheLayer, ctx: ScoreContext, cap: int) -> Room | None:
        """Decode phase, before one token is added: where every row writes it, or None (all append).

        cap: this row's budget ``ctx.keep`` read on the host; rows holding ``cap`` entries evict the
        lowest-scored one. Rows are compared on the host, so only a full row touches the device.
        """
        if not layer.initialized:
            return None
        host_full = [n >= cap for n in layer.host_lengths()]
        if not any(host_full):
            return None
        assert layer.lengths is not None
        scores = self.score(layer, ctx).float()
        if not layer.uniform:
            scores = scores.masked_fill(~layer.valid_mask(), float("inf"))
        full = torch.tensor(host_full, device=scores.device).view(layer.lengths.shape)
        return Room(scores.argmin(dim=-1), full, host_full)

