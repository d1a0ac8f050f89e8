"""The compressor interface: a method is a small dataclass that overrides :meth:`Compressor.score`.

Contract (who calls what, in which order; the engine drives it, see ``engine/forward.py``):

1. ``observe(layer, ctx, query, key_mass)`` - during every forward pass in an active phase, right
   after the layer's attention. Methods that need queries (SnapKV's observation window) or attention
   mass (H2O) keep it in the layer (``layer.extra`` / ``layer.slot_state``). ``key_mass`` is passed
   only to methods with ``needs_key_mass = True``; it costs an explicit attention computation.
2. ``compress(layer, ctx)`` - after a prefill segment (prefill phase) or after a multi-token pass in
   the decode phase: keep the ``ctx.keep`` highest-scored entries of every row; the rest is freed.
   It may return a layer object that replaces ``layer`` in the cache (quantizers return a
   :class:`~slimkv.cache.QuantizedLayer`); eviction methods shrink the layer in place and return None.
3. ``make_room(layer, ctx)`` - decode phase, before one new token is written: for rows at their
   budget, pick the entry to evict (the lowest score); the new token takes its slot.

``score(layer, ctx) -> [batch, kv_heads, L]`` (higher = keep) is the one method a method overrides.
Scores of free slots are ignored. Budgets: ``ratio`` is the fraction of entries *removed* (kvpress's
convention: 0.75 keeps a quarter) relative to every token seen; ``budget`` is a fixed number of entries
kept per layer and KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..cache import KVLayer
from ..errors import ConfigError
from .schedules import check_schedule, layer_keep

PHASES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class ScoreContext:
    """What a compressor knows about the layer it acts on.

    layer_idx: index of the layer; num_layers: layers in the model
    keep: [batch] entries each row of this layer should hold after the operation
    seen: [batch] tokens processed per sequence, counting a token about to be added
    phase: "prefill" or "decode"
    """

    layer_idx: int
    num_layers: int
    keep: Tensor
    seen: Tensor
    phase: str


@dataclass
class Compressor:
    """Base class of every KV cache compression method.

    ratio:  fraction of KV entries removed, in [0, 1); kvpress's convention
    budget: entries kept per layer and KV head (instead of a ratio); with a non-uniform schedule,
            the mean over layers
    phase:  "prefill", "decode" or "both"; None picks the method's ``default_phase``
    schedule: how the budget is spread over layers: "uniform" or "pyramid" (``schedules.py``)
    beta:   steepness of the pyramid: the last layer keeps 1/beta of the mean budget
    """

    ratio: float | None = None
    budget: int | None = None
    phase: str | None = None
    schedule: str = "uniform"
    beta: float = 20.0

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "eviction"
    paper: ClassVar[str] = ""
    supported_phases: ClassVar[tuple[str, ...]] = ("prefill",)
    default_phase: ClassVar[str] = "prefill"
    needs_key_mass: ClassVar[bool] = False
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
        return f"{self.name}({amount}, phase={self.phase}{layers})"

    def keep_for(self, seen: Tensor, layer_idx: int = 0, num_layers: int = 1) -> Tensor:
        """Entries layer ``layer_idx`` keeps per row for ``seen`` tokens processed ([batch] -> [batch])."""
        if self.budget is not None:
            kept = torch.clamp(seen, max=int(self.budget))
        else:
            kept = torch.clamp((seen.double() * (1.0 - float(self.ratio or 0.0))).long(), min=1)  # int(), as kvpress
        return layer_keep(kept, seen, layer_idx, num_layers, self.schedule, self.beta)

    def bind(self, adapter, tokenizer) -> None:
        """Called by the engine with its model before this method acts on it (calibrated methods such as
        CommVQ load or fit per-model data here); a no-op for most methods."""

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

    # ------------------------------------------------------------------ driven by the engine
    def compress(self, layer: KVLayer, ctx: ScoreContext) -> None:
        """Keep the ``ctx.keep`` best entries of every row; free the rest (real bytes)."""
        if not layer.initialized:
            return
        assert layer.lengths is not None
        keep = ctx.keep.to(layer.lengths.device)[:, None]  # [B, 1]
        if bool((layer.lengths <= keep).all()):
            layer.extra.clear()
            return
        scores = self.score(layer, ctx).float()
        if not layer.uniform:
            scores = scores.masked_fill(~layer.valid_mask(), float("-inf"))
        lengths = torch.minimum(layer.lengths, keep)  # [B, H]
        k = int(lengths.max())
        indices = scores.topk(k, dim=-1).indices  # [B, H, k], best first
        ragged = bool((lengths != k).any())
        if ragged:
            # rows keep only their first `lengths` choices; the rest become free slots at the tail
            length = scores.shape[-1]
            rank = torch.arange(k, device=indices.device)
            indices = torch.where(rank < lengths[..., None], indices, length)
            indices = indices.sort(dim=-1).values.clamp(max=length - 1)
        layer.keep(indices, lengths if ragged else None)
        layer.extra.clear()

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
