"""Composition: several methods applied to the same cache in order, e.g. SnapKV eviction then KIVI.

Contract: a :class:`Pipeline` is a :class:`~slimkv.compressors.Compressor` to the engine. Its
``compress`` runs each stage's ``compress`` in order on the layer a previous stage left (a quantizer
returns a new, quantized layer), so eviction scores are computed on full-precision entries and only
what is kept gets quantized; positions stay explicit per entry throughout. ``observe`` goes to every
stage active in the phase, ``make_room`` to the one stage that acts while decoding (if any).

Order rules (checked at configuration time, :class:`ConfigError` otherwise), by the stages' kinds:
eviction, then merging, then quantization; at most one stage of each kind (two eviction methods
would need a rule saying which gets the ratio); at most one stage acting in the decode phase, and none
with a quantizer (quantized entries cannot be evicted one at a time). By name, ``a+b`` gives
``ratio``, ``budget`` and ``phase`` to every stage that is not a quantizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

from ..cache import KVLayer
from ..errors import ConfigError
from .base import Compressor, ScoreContext

#: the order stages must come in, by kind
ORDER = ("eviction", "merging", "quantization")


@dataclass
class Pipeline(Compressor):
    """Methods applied in order to the same cache: eviction first, a quantizer last.

    stages: the methods, in the order they act (each with its own ratio, budget and phase)
    """

    stages: tuple[Compressor, ...] = ()

    kind = "pipeline"
    paper = "-"

    def __post_init__(self) -> None:
        if self.ratio is not None or self.budget is not None or self.phase is not None:
            raise ConfigError(
                "a Pipeline takes only `stages=(...)`; the ratio, budget and phase belong to its eviction stage, "
                "e.g. Pipeline(stages=(make_compressor('snapkv', ratio=0.5), make_compressor('kivi2')))"
            )
        self.stages = tuple(self.stages)
        if len(self.stages) < 2:
            raise ConfigError("a pipeline needs at least two stages, e.g. snapkv+kivi2")
        self.name = "+".join(s.name for s in self.stages)
        _check_order(self.stages)
        deciders = [s for s in self.stages if s.active("decode")]
        quantizing = any(getattr(s, "quantizes", False) for s in self.stages)
        if deciders and quantizing:
            raise ConfigError(
                f"{self.name}: {deciders[0].name} in the decode phase would evict quantized entries one "
                "at a time, which a quantized layer does not do; use --phase prefill (evict the prompt, "
                "then quantize what is kept)"
            )
        if len(deciders) > 1:
            raise ConfigError(f"{self.name}: at most one stage may act in the decode phase")
        evicting = [s for s in self.stages if not getattr(s, "quantizes", False)]
        lead = evicting[0] if evicting else self.stages[0]
        # the pipeline reports its eviction stage's settings (describe, store keys)
        self.ratio, self.budget, self.phase = lead.ratio, lead.budget, lead.phase
        self.needs_key_mass = any(s.needs_key_mass for s in self.stages)
        self.quantizes = quantizing
        self.supported_phases = tuple(sorted({p for s in self.stages for p in s.supported_phases}))

    # ------------------------------------------------------------------ configuration
    @property
    def compresses(self) -> bool:
        return any(s.compresses for s in self.stages)

    def active(self, phase: str) -> bool:
        return any(s.active(phase) for s in self.stages)

    def describe(self) -> str:
        return " + ".join(s.describe() for s in self.stages)

    def keep_for(self, seen: Tensor, layer_idx: int = 0, num_layers: int = 1) -> Tensor:
        """Entries per row once every stage has acted (the smallest of the stages' targets)."""
        keep = seen.clone()
        for s in self.stages:
            keep = keep.minimum(s.keep_for(seen, layer_idx, num_layers))
        return keep

    def bind(self, adapter, tokenizer) -> None:
        for s in self.stages:
            s.bind(adapter, tokenizer)

    # ------------------------------------------------------------------ driven by the engine
    def observe(self, layer: KVLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        if getattr(layer, "quantized", False):
            return  # nothing will be evicted from a quantized layer: no need to watch it
        for s in self.stages:
            if s.active(ctx.phase):
                s.observe(layer, self._for(s, ctx), query, query_positions, key_mass)

    def compress(self, layer: KVLayer, ctx: ScoreContext):
        """Each compressing stage in turn; returns the layer the last one left (maybe a new object)."""
        for s in self.stages:
            if s.compresses:
                out = s.compress(layer, self._for(s, ctx))
                layer = out if out is not None else layer
        return layer

    def make_room(self, layer: KVLayer, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        for s in self.stages:
            if s.active("decode"):
                return s.make_room(layer, self._for(s, ctx))
        return None

    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("a pipeline scores nothing itself; its stages do")

    @staticmethod
    def _for(stage: Compressor, ctx: ScoreContext) -> ScoreContext:
        return dataclasses.replace(ctx, keep=stage.keep_for(ctx.seen, ctx.layer_idx, ctx.num_layers))


def _check_order(stages: tuple[Compressor, ...]) -> None:
    name = "+".join(s.name for s in stages)
    for s in stages:
        if s.kind not in ORDER:
            raise ConfigError(
                f"{name}: {s.name} ({s.kind}) cannot be composed; pipelines take "
                f"{', '.join(ORDER)} methods"
            )
    ranks = [ORDER.index(s.kind) for s in stages]
    for a, b, ra, rb in zip(stages, stages[1:], ranks, ranks[1:]):
        if ra == rb:
            raise ConfigError(
                f"{name}: {a.name} and {b.name} are both {a.kind} methods; a pipeline takes at most one "
                "of each kind"
            )
        if ra > rb:
            raise ConfigError(
                f"{name}: {b.name} ({b.kind}) must come before {a.name} ({a.kind}); stages go "
                f"{' -> '.join(ORDER)}, e.g. {b.name}+{a.name}"
            )


def compose(names: list[str], ratio: float | None = None, budget: int | None = None,
            phase: str | None = None) -> Pipeline:
    """A pipeline from registered names; ratio, budget and phase go to the stages that are not quantizers."""
    from .registry import make_compressor, method_info

    stages = []
    for n in names:
        if not n:
            raise ConfigError("empty method name in a composition; write e.g. snapkv+kivi2")
        if method_info(n).kind == "quantization":
            stages.append(make_compressor(n, phase=None))
        else:
            stages.append(make_compressor(n, ratio=ratio, budget=budget, phase=phase))
    return Pipeline(stages=tuple(stages))
