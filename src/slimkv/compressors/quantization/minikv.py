"""MiniKV: 2-bit KIVI quantization of what a layer-discriminative eviction keeps.

Paper: Sharma et al., "MiniKV: Pushing the Limits of LLM Inference via 2-Bit Layer-Discriminative
KV Cache", arXiv:2411.18077.

Eviction picks entries with SnapKV's observation-window votes, but the budget is not the same in every
layer: lower layers (which attend broadly) keep more, deeper layers (which attend to few tokens) keep
fewer, on a straight line whose average is the usual ``keep`` - the same total bytes as a uniform
budget (the ``pyramid`` schedule of ``compressors/schedules.py``; ``beta=2``: the first layer keeps
1.5x the average, the last 0.5x). What is kept is then quantized to 2 bits (``kivi.py``). Only the prefill phase compresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ...cache import KVLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..eviction.snapkv import SnapKVCompressor
from ..registry import register
from .kivi import KIVI2


@register
@dataclass
class MiniKV(Compressor):
    """Pyramid SnapKV budgets (more entries in lower layers, same total), then 2-bit KIVI.

    schedule, beta: the layer budget schedule (default pyramid, beta 2: 1.5x the average budget in
          the first layer down to 0.5x in the last)
    window, kernel: SnapKV's observation window and pooling kernel
    group, residual, sinks, rotate, wide_keys: KIVI's key group, full-precision residual and sinks,
          rotation, calibrated wide-key layers (see kivi2)
    """

    schedule: str = "pyramid"
    beta: float = 2.0
    window: int = 16
    kernel: int = 7
    group: int = 128
    residual: int = 0
    sinks: int = 4
    rotate: bool = True
    wide_keys: int = 1
    _snapkv: SnapKVCompressor = field(init=False, repr=False, compare=False)

    name = "minikv"
    kind = "quantization"
    paper = ("Sharma et al., MiniKV: Pushing the Limits of LLM Inference via 2-Bit Layer-Discriminative "
             "KV Cache, arXiv:2411.18077")
    supported_phases = ("prefill",)
    quantizes = True
    bits = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self._snapkv = SnapKVCompressor(ratio=self.ratio, budget=self.budget, window=self.window,
                                        kernel=self.kernel)
        if self.sinks < 0:
            raise ConfigError(f"minikv sinks must be >= 0 tokens, got {self.sinks}")
        self._kivi = KIVI2(group=self.group, residual=self.residual, sinks=self.sinks, rotate=self.rotate,
                           wide_keys=self.wide_keys)
        self.spec = self._kivi.spec

    def bind(self, engine) -> None:
        self._kivi.bind(engine)

    @property
    def wide_layers(self) -> frozenset[int]:
        return self._kivi.wide_layers

    @property
    def compresses(self) -> bool:
        return True  # quantizes even when nothing is evicted

    def describe(self) -> str:
        return (f"{super().describe()[:-1]}, beta={self.beta}, group={self.group}, residual={self.residual}, "
                f"sinks={self.sinks}, rotate={self.rotate}, wide_keys={self.wide_keys})")

    def observe(self, layer: KVLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        if not getattr(layer, "quantized", False):
            self._snapkv.observe(layer, ctx, query, query_positions, key_mass)

    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:
        return self._snapkv.score(layer, ctx)

    def compress(self, layer, ctx: ScoreContext):
        if getattr(layer, "quantized", False) or not layer.initialized:
            return layer
        if self._snapkv.compresses:  # ctx.keep is already this layer's budget (the pyramid schedule)
            self._snapkv.compress(layer, ctx)
        return self._kivi.quantize(layer, ctx.layer_idx)
