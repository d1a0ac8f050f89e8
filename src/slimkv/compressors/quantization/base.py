"""The quantizer interface: a compressor that converts a dense layer into a quantized one.

Contract: the engine calls ``compress(layer, ctx)`` after prefill (``ForwardContext.compress``); a
quantizer returns the :class:`~slimkv.cache.QuantizedLayer` that replaces ``layer`` in the cache
(``quantize`` is the one method a quantizer overrides). From then on the layer quantizes new entries
itself as its groups fill, so a quantizer acts in the prefill phase only and removes nothing: its
``keep_for`` is every token seen. To evict as well, compose (``compressors/compose.py``): eviction
first, then the quantizer, e.g. ``snapkv+kivi2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...cache import CacheLayer, KVLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext


@dataclass
class Quantizer(Compressor):
    """Base class of quantization methods (kind ``quantization``; ratio and budget do not apply)."""

    kind: ClassVar[str] = "quantization"
    supported_phases: ClassVar[tuple[str, ...]] = ("prefill",)
    quantizes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None or self.ratio:
            raise ConfigError(
                f"{self.name} quantizes every entry and removes none, so it takes no ratio or budget; "
                f"to evict as well, compose an eviction method before it, e.g. "
                f"`--compressor snapkv+{self.name} --ratio 0.5`"
            )

    @property
    def compresses(self) -> bool:
        return True

    def keep_for(self, seen: Tensor, layer_idx: int = 0, num_layers: int = 1) -> Tensor:
        return seen.clone()

    def describe(self) -> str:
        return f"{self.name}({self.params()})"

    def params(self) -> str:
        """The settings shown by ``describe``."""
        return ""

    def quantize(self, layer: KVLayer, layer_idx: int = 0, bound: Any = None) -> CacheLayer:
        """The quantized form of a dense layer (its entries in time order) at index ``layer_idx``.

        bound: what :meth:`bind` returned for the model (per-layer choices, codebooks)
        """
        raise NotImplementedError

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("a quantizer keeps every entry; it does not score them")

    def compress(self, layer: CacheLayer, ctx: ScoreContext, merger: Compressor | None = None) -> CacheLayer:
        """Return the quantized layer that replaces ``layer`` (a quantized layer is returned as is)."""
        if layer.quantized or not layer.initialized:
            return layer
        assert isinstance(layer, KVLayer), "a quantizer converts a dense layer"
        return self.quantize(layer, ctx.layer_idx, ctx.bound)
