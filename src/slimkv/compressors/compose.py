"""Composition: several methods applied to the same cache in order, e.g. SnapKV eviction then KIVI.

Contract: a :class:`Pipeline` is a :class:`~slimkv.compressors.Compressor` to the engine. Its
``compress`` runs its steps in order on the layer a previous step left (a quantizer returns a new,
quantized layer), so eviction scores are computed on full-precision entries and only what is kept
gets quantized; positions stay explicit per entry throughout. ``observe`` goes to every stage active
in the phase (but a merging stage after an eviction stage, which only merges), ``make_room`` to the
one stage that acts while decoding (if any).

What the kinds mean together, by example:

- ``snapkv+kivi2``: evict, then quantize what is kept.
- ``snapkv+kvmerger``: SnapKV chooses the kept set; the entries it frees are not dropped but handed
  to KVMerger's ``merge``, which folds each into a kept neighbour of similar key (Gaussian weights).
  The pipeline keeps the smaller of the two stages' budgets.
- ``snapkv+keydiff`` (eviction + eviction): one selection by the *average rank* of the methods'
  scores (each entry's rank within its row, 0 = worst, 1 = best, averaged; an entry a method always
  keeps - its window or sinks - stays kept). Prefill phase only, with the smallest budget.

Order rules (checked at configuration time, :class:`ConfigError` otherwise), by the stages' kinds:
eviction, then merging, then quantization; at most one merging and one quantization stage; a merging
stage merges only what a prefill eviction frees (an eviction method acting while decoding frees one
entry per step, which nothing would merge); at most one stage acting in the decode phase, and none
with a quantizer (quantized entries cannot be evicted one at a time). By name, ``a+b`` gives
``ratio``, ``budget`` and ``phase`` to every stage that is not a quantizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..cache import CacheLayer, CacheSpec, Room, StateKey
from ..errors import ConfigError
from .base import Compressor, ModelAccess, ScoreContext

#: the order stages must come in, by kind
ORDER = ("eviction", "merging", "quantization")


@dataclass
class Pipeline(Compressor):
    """Methods applied in order to the same cache: eviction first, a quantizer last.

    stages: the methods, in the order they act (each with its own ratio, budget and phase)
    """

    stages: tuple[Compressor, ...] = ()
    _plan: tuple[tuple[Compressor, Compressor | None], ...] = field(init=False, repr=False, compare=False,
                                                                    default=())

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
        self._plan = _plan(self.name, self.stages)
        deciders = [s for s in self.stages if s.active("decode")]
        quantizing = any(s.quantizes for s in self.stages)
        if deciders and quantizing:
            raise ConfigError(
                f"{self.name}: {deciders[0].name} in the decode phase would evict quantized entries one "
                "at a time, which a quantized layer does not do; use --phase prefill (evict the prompt, "
                "then quantize what is kept)"
            )
        headwise = [s for s in self.stages if s.allocation == "head"]
        if headwise and quantizing:
            raise ConfigError(
                f"{self.name}: {headwise[0].name} gives KV heads different budgets (a ragged, paged layer), "
                "and a quantized layer needs every head to hold the same number of entries; use "
                "allocation='uniform' (or a uniform method such as snapkv) with a quantizer"
            )
        if len(deciders) > 1:
            raise ConfigError(f"{self.name}: at most one stage may act in the decode phase")
        evicting = [s for s in self.stages if not s.quantizes]
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

    # ------------------------------------------------------------------ state and binding
    def bind(self, model: ModelAccess) -> tuple[Any, ...]:
        """Every stage's bound data, in stage order."""
        return tuple(s.bind(model) for s in self.stages)

    def _observers(self) -> list[Compressor]:
        merge_only = {id(m) for _, m in self._plan if m is not None}
        return [s for s in self.stages if id(s) not in merge_only]

    def recorders(self, phase: str) -> list[Compressor]:
        """The recording parts of every stage (a merging stage after an eviction stage only merges)."""
        return [r for s in self._observers() for r in s.recorders(phase)]

    def kept_states(self) -> set[StateKey]:
        return set().union(*(s.kept_states() for s in self.stages))

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        seen: dict[StateKey, int] = {}
        for s in self._observers():
            seen.setdefault(s.state_key, s.state_bytes(spec, q_heads, tokens))
        return sum(seen.values())

    # ------------------------------------------------------------------ driven by the engine

    def compress(self, layer: CacheLayer, ctx: ScoreContext, merger: Compressor | None = None) -> CacheLayer:
        """Each compressing step in turn; returns the layer the last one left (maybe a new object).

        Observed state stays in the request's cache until the whole pipeline is done (ZipVL after an
        eviction reads the observation window's queries too); the engine frees it afterwards.
        """
        steps = [(step, m) for step, m in self._plan if step.compresses or (m is not None and m.compresses)]
        for step, m in steps:
            if m is not None:
                keep = self._for(step, ctx).keep.minimum(self._for(m, ctx).keep)
                out = step.compress(layer, dataclasses.replace(self._for(step, ctx), keep=keep), merger=m)
            else:
                out = step.compress(layer, self._for(step, ctx))
            layer = out if out is not None else layer  # a head-wise step or a quantizer hands back a new layer
        return layer

    def make_room(self, layer: CacheLayer, ctx: ScoreContext, cap: int) -> Room | None:
        for s in self.stages:
            if s.active("decode"):
                return s.make_room(layer, self._for(s, ctx), cap)
        return None

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("a pipeline scores nothing itself; its stages do")

    def _bound(self, stage: Compressor, bound: tuple[Any, ...] | None) -> Any:
        """The bound data of ``stage`` (a stage, or the rank average of the eviction stages)."""
        if bound is None:
            return None
        if isinstance(stage, RankAverage):
            return tuple(self._bound(m, bound) for m in stage.members)
        return next(b for s, b in zip(self.stages, bound) if s is stage)

    def _for(self, stage: Compressor, ctx: ScoreContext) -> ScoreContext:
        return dataclasses.replace(ctx, keep=stage.keep_for(ctx.seen, ctx.layer_idx, ctx.num_layers),
                                   bound=self._bound(stage, ctx.bound))


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
        if ra == rb and a.kind != "eviction":
            raise ConfigError(
                f"{name}: {a.name} and {b.name} are both {a.kind} methods; a pipeline takes at most one "
                f"{a.kind} method (several eviction methods are combined by rank, e.g. snapkv+keydiff)"
            )
        if ra > rb:
            raise ConfigError(
                f"{name}: {b.name} ({b.kind}) must come before {a.name} ({a.kind}); stages go "
                f"{' -> '.join(ORDER)}, e.g. {b.name}+{a.name}"
            )


def _plan(name: str, stages: tuple[Compressor, ...]) -> tuple[tuple[Compressor, Compressor | None], ...]:
    """The steps ``compress`` runs: (method, the merging stage folding what it frees, or None).

    Consecutive eviction stages become one :class:`RankAverage`; a merging stage right after an
    eviction step becomes that step's merger.
    """
    evicting = [s for s in stages if s.kind == "eviction"]
    steps: list[tuple[Compressor, Compressor | None]] = []
    if len(evicting) > 1:
        deciding = [s.name for s in evicting if s.active("decode") or not s.active("prefill")]
        if deciding:
            raise ConfigError(
                f"{name}: eviction methods are combined by averaging their ranks once, after the prompt; "
                f"{deciding[0]} is set to act while decoding; use --phase prefill, or one eviction method"
            )
        steps.append((RankAverage(members=tuple(evicting)), None))
    elif evicting:
        steps.append((evicting[0], None))
    for s in stages:
        if s.kind == "merging" and steps:
            lead = steps[-1][0]
            if lead.active("decode"):
                raise ConfigError(
                    f"{name}: {s.name} merges what an eviction method frees after the prompt, but "
                    f"{lead.name} also evicts while decoding (one entry per step, which nothing would "
                    f"merge); use --phase prefill, or {lead.name} alone for decode-phase eviction"
                )
            steps[-1] = (lead, s)
        elif s.kind != "eviction":
            steps.append((s, None))
    return tuple(steps)


@dataclass
class RankAverage(Compressor):
    """Several eviction methods as one: keep the entries with the best average rank of their scores.

    members: the eviction methods (each observes as usual); the budget is the smallest of theirs
    """

    members: tuple[Compressor, ...] = ()

    def __post_init__(self) -> None:
        self.name = "+".join(m.name for m in self.members)
        lead = self.members[0]
        self.ratio, self.budget, self.phase = lead.ratio, lead.budget, "prefill"
        self.needs_key_mass = any(m.needs_key_mass for m in self.members)

    @property
    def compresses(self) -> bool:
        return any(m.compresses for m in self.members)

    def keep_for(self, seen: Tensor, layer_idx: int = 0, num_layers: int = 1) -> Tensor:
        keep = seen.clone()
        for m in self.members:
            keep = keep.minimum(m.keep_for(seen, layer_idx, num_layers))
        return keep

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        """Mean over members of each entry's rank in its row, in [0, 1); inf where any member insists.

        ctx.bound: the members' bound data, in member order (or None)
        """
        total, pinned = None, None
        valid = None if layer.uniform else layer.valid_mask()
        for i, m in enumerate(self.members):
            bound = None if ctx.bound is None else ctx.bound[i]
            s = m.score(layer, dataclasses.replace(ctx, bound=bound)).float()  # [B, H, L]
            if valid is not None:
                s = s.masked_fill(~valid, float("-inf"))
            rank = s.argsort(dim=-1).argsort(dim=-1).float() / s.shape[-1]
            inf = s == float("inf")
            total = rank if total is None else total + rank
            pinned = inf if pinned is None else pinned | inf
        assert total is not None and pinned is not None
        return (total / len(self.members)).masked_fill(pinned, float("inf"))


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
