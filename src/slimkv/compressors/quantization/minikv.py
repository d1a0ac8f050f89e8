"""MiniKV: 2-bit KIVI quantization of what a layer-discriminative eviction keeps.

Paper: Sharma et al., "MiniKV: Pushing the Limits of LLM Inference via 2-Bit Layer-Discriminative
KV Cache", arXiv:2411.18077.

Eviction picks entries by a scoring method, but the budget is not the same in every layer: lower layers (which attend broadly) keep more, deeper layers (which attend to few tokens) keep
fewer, on a straight line whose average is the usual ``keep`` - the same total bytes as a uniform
budget (the ``pyramid`` schedule of ``compressors/schedules.py``; ``beta=2``: the first layer keeps
1.5x the average, the last 0.5x). What is kept is then quantized to 2 bits (``kivi.py``). Only the
prefill phase compresses.

The scorer: the paper votes with SnapKV's observation window (the attention of the prompt's last
tokens), ``scorer="snapkv"``. That needs the question at the end of the prompt. Compressed before the
question is known (question-agnostic: a context stored once and asked many things, the setting of
slimkv's store and prefix reuse) those last tokens are haystack, and the needle is lost: 2% of the
full cache's needle score at ratio 0.5 on the embedded model, against 93% with the question. The
default scorer is therefore ``keydiff`` (key distinctiveness, no queries needed); the layer budgets and
the 2-bit storage - what makes the method MiniKV - are unchanged. ``minikv_paper`` rows on the
leaderboard are ``scorer="snapkv"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ...cache import CacheLayer, CacheSpec, KVLayer
from ...errors import ConfigError
from ..base import Compressor, ModelAccess, ScoreContext
from ..eviction.keydiff import KeyDiffCompressor
from ..eviction.snapkv import SnapKVCompressor
from ..registry import register
from .kivi import KIVI2

SCORERS = ("keydiff", "snapkv")


@register
@dataclass
class MiniKV(Compressor):
    """Pyramid eviction budgets (more entries in lower layers, same total), then 2-bit KIVI.

    scorer: what chooses the kept entries: "keydiff" (question-agnostic, the default) or "snapkv"
          (the paper's observation-window votes; needs the question in the prompt)
    schedule, beta: the layer budget schedule (default pyramid, beta 2: 1.5x the average budget in
          the first layer down to 0.5x in the last)
    window, kernel: SnapKV's observation window and pooling kernel (scorer="snapkv")
    group, residual, sinks, rotate, wide_keys: KIVI's key group, full-precision residual and sinks,
          rotation, calibrated wide-key layers (see kivi2)
    """

    scorer: str = "keydiff"
    schedule: str = "pyramid"
    beta: float = 2.0
    window: int = 16
    kernel: int = 7
    group: int = 128
    residual: int = 0
    sinks: int = 4
    rotate: bool = True
    wide_keys: int = 1
    _select: Compressor = field(init=False, repr=False, compare=False)

    name = "minikv"
    kind = "quantization"
    paper = ("Sharma et al., MiniKV: Pushing the Limits of LLM Inference via 2-Bit Layer-Discriminative "
             "KV Cache, arXiv:2411.18077")
    supported_phases = ("prefill",)
    quantizes = True
    bits = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ConfigError(f"minikv sinks must be >= 0 tokens, got {self.sinks}")
        if self.scorer == "snapkv":
            self._select = SnapKVCompressor(ratio=self.ratio, budget=self.budget, window=self.window,
                                            kernel=self.kernel)
        elif self.scorer == "keydiff":
            self._select = KeyDiffCompressor(ratio=self.ratio, budget=self.budget, sinks=self.sinks)
        else:
            raise ConfigError(f"minikv scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        self._kivi = KIVI2(group=self.group, residual=self.residual, sinks=self.sinks, rotate=self.rotate,
                           wide_keys=self.wide_keys)
        self.spec = self._kivi.spec

    def bind(self, model: ModelAccess) -> frozenset[int]:
        return self._kivi.bind(model)

    @property
    def compresses(self) -> bool:
        return True  # quantizes even when nothing is evicted

    def describe(self) -> str:
        return (f"{super().describe()[:-1]}, scorer={self.scorer}, beta={self.beta}, group={self.group}, residual={self.residual}, "
                f"sinks={self.sinks}, rotate={self.rotate}, wide_keys={self.wide_keys})")

    def recorders(self, phase: str) -> list[Compressor]:
        """The selector's records (SnapKV's window; keydiff records nothing)."""
        select = self._select
        return [select] if self.active(phase) and type(select).observe is not Compressor.observe else []

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        return self._select.state_bytes(spec, q_heads, tokens)

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        return self._select.score(layer, ctx)

    def compress(self, layer: CacheLayer, ctx: ScoreContext, merger: Any = None) -> CacheLayer:
        if layer.quantized or not layer.initialized:
            return layer
        if self._select.compresses:  # ctx.keep is already this layer's budget (the pyramid schedule)
            self._select.compress(layer, ctx)
        assert isinstance(layer, KVLayer)
        return self._kivi.quantize(layer, ctx.layer_idx, ctx.bound)
