"""The compressor interface: a method is a small dataclass that overrides :meth:`Compressor.score`.

Contract (who calls what, in which order; the engine drives it, see ``engine/forward.py``):

0. ``bind(engine)`` - whenever an engine takes the compressor (``Engine(...)``,
   ``Engine.with_compressor``, the perplexity evaluator), before it acts. Methods that need something of the model itself (TriAttention's
   calibrated query centres and RoPE frequencies) load it here; the others ignore it.
1. ``observe(layer, ctx, query, key_mass)`` - during every forward pass in an active phase, right
   after the layer's attention. Methods that need queries (SnapKV's observation window) or attention
   mass (H2O) keep it in the layer (``layer.extra`` / ``layer.slot_state``). ``key_mass`` is passed
   only to methods with ``needs_key_mass = True``; it costs an explicit attention computation.
2. ``compress(layer, ctx)`` - after a prefill segment (prefill phase) or after a multi-token pass in
   the decode phase: ``select`` the ``ctx.keep`` highest-scored entries of every row, let ``merge``
   fold the others into the kept ones (merging methods; eviction methods drop them), then free them.
   It may return a layer object that replaces ``layer`` in the cache (quantizers return a
   :class:`~slimkv.cache.QuantizedLayer`); eviction methods shrink the layer in place and return None.
   A pipeline passes its merging stage as ``merger``: the eviction stage chooses, the merger folds.
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

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..cache import KVLayer, RaggedLayer
from ..cache.ragged import pages_pay
from ..errors import ConfigError
from .allocation import allocate_heads, check_allocation
from .schedules import check_schedule, layer_keep

PHASES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class ScoreContext:
    """What a compressor knows about the layer it acts on.

    layer_idx: index of the layer; num_layers: layers in the model
    keep: [batch] entries each row of this layer should hold after the operation
    seen: [batch] tokens processed per sequence, counting a token about to be added
    phase: "prefill" or "decode"
    punctuation: [batch, tokens] bool, which new tokens of this pass are punctuation; given to
                 observers with ``needs_punctuation`` by the engine's prefill and generation loop
                 (None otherwise)
    """

    layer_idx: int
    num_layers: int
    keep: Tensor
    seen: Tensor
    phase: str
    punctuation: Tensor | None = None


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
    phase: str | None = None
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
    #: ``layer.extra`` entries that outlive a compression when the decode phase follows (ALISA's latest
    #: queries, FastGen's per-head policies); every other entry is prefill state and is dropped
    decode_state: ClassVar[tuple[str, ...]] = ()
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

    def bind(self, engine) -> None:
        """Load what this method needs from the model ``engine`` runs (default: nothing).

        Called by the engine before the compressor acts; must be cheap when called again for the
        same model (the engine calls it for every ``with_compressor``).
        """

    # ------------------------------------------------------------------ the one method to override
    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:
        """Importance of every slot of ``layer.view()``: ``[batch, kv_heads, L]``, higher = keep."""
        raise NotImplementedError

    def observe(self, layer: KVLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        """Record what scoring will need (called after each attention in an active phase).

        query: [batch, q_heads, tokens, head_dim]; query_positions: [batch, tokens]
        key_mass: [batch, kv_heads, L] attention each slot received, if ``needs_key_mass``
        """

    def merge(self, layer: KVLayer, ctx: ScoreContext, kept: Tensor, lengths: Tensor | None) -> None:
        """Fold the entries about to be freed into kept ones, in place (merging methods override this).

        kept:    [batch, kv_heads, k] slots each row keeps (the rest of ``layer.view()`` is freed next)
        lengths: None, or [batch, kv_heads] for ragged rows: a row keeps only its first ``lengths`` slots
        The default drops them (eviction).
        """

    # ------------------------------------------------------------------ driven by the engine
    def select(self, layer: KVLayer, ctx: ScoreContext) -> tuple[Tensor, Tensor | None]:
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

    def compress(self, layer: KVLayer, ctx: ScoreContext, merger: Compressor | None = None) -> KVLayer | None:
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
        keep = ctx.keep.to(layer.lengths.device)[:, None]  # [B, 1]
        if bool((layer.lengths <= keep).all()):
            self.drop_state(layer)
            return
        indices, lengths = self.select(layer, ctx)
        (merger or self).merge(layer, ctx, indices, lengths)
        layer.keep(indices, lengths)
        self.drop_state(layer)

    def drop_state(self, layer: KVLayer) -> None:
        """Free what observing the prompt left in ``layer.extra``, but the ``decode_state`` entries
        when this method also acts while decoding."""
        kept = {k: layer.extra[k] for k in self.decode_state if k in layer.extra} if self.active("decode") else {}
        layer.extra.clear()
        layer.extra.update(kept)

    def _compress_heads(self, layer: KVLayer, ctx: ScoreContext,
                        merger: Compressor | None = None) -> KVLayer | None:
        """Keep ``kv_heads * ctx.keep`` entries per sequence, shared by score over the heads (AdaKV).

        Returns a :class:`RaggedLayer` replacing ``layer`` when heads end up with different counts.
        """
        assert layer.lengths is not None
        keep = ctx.keep.to(layer.lengths.device)  # [B]
        total = keep * layer.lengths.shape[1]
        if bool((layer.lengths.sum(dim=-1) <= total).all()) and not self.excludes:
            self.drop_state(layer)
            return None
        scores = self.score(layer, ctx).float().masked_fill(~layer.valid_mask(), float("-inf"))
        lengths, indices = allocate_heads(scores, total, (keep.double() * self.floor).long())
        if merger is not None or type(self).merge is not Compressor.merge:
            if isinstance(layer, RaggedLayer):
                raise ValueError("merging into a paged (ragged) layer is not supported; "
                                 "merge on the first compression")
            (merger or self).merge(layer, ctx, indices, lengths)
        layer.keep(indices, lengths)
        self.drop_state(layer)
        if isinstance(layer, RaggedLayer) or not pages_pay(lengths):
            return None  # (equal or nearly equal heads: padding costs less than pages)
        return RaggedLayer.from_layer(layer)

    def make_room(self, layer: KVLayer, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        """Decode phase: ``(victim slots [B, H], full [B, H])`` before one token is added, or None."""
        if not layer.initialized:
            return None
        assert layer.lengths is not None
        full = layer.lengths >= ctx.keep.to(layer.lengths.device)[:, None]
        if not bool(full.any()):
            return None
        scores = self.score(layer, ctx).float()
        if not layer.uniform:
            scores = scores.masked_fill(~layer.valid_mask(), float("inf"))
        return scores.argmin(dim=-1), full
