"""KIVI: keys quantized per channel, values per token, asymmetric, with a full-precision residual.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv:2402.02750.

Keys have outlier *channels*, so each channel is quantized over a group of consecutive tokens; values
have no such structure and are quantized per token over groups of channels. Tokens that do not yet
fill a key group stay in full precision and are quantized together once ``group`` of them have
arrived. Storage and attention live in ``cache/quantized.py``; bytes are really saved (codes packed
four to a byte at 2 bits, two at 4 bits).

Defaults, chosen for the effective bits per element (``bytes_kept * 8 / stored key and value
elements``, everything counted: codes, float16 scales and zero points, positions, the residual) on
the embedded SmolLM2 (head_dim 64): group 128 costs 2 x 16 bits / 128 tokens = 0.25 bits per key
element and 2 x 16 / 64 channels = 0.5 bits per value element, 0.375 bits on average; int16
positions shared by the heads add about 0.04. The residual is stored in the model dtype (float32 for
the embedded model, 30 bits over a 2-bit entry), so ``residual`` defaults to 0: the prompt is fully
quantized and only decoded tokens wait in full precision until a group fills.

Wide keys (slimkv's addition, 2 bits only): a few layers of a model cannot read 2-bit keys - on the
embedded model layer 18 alone turns the needle 89920 into 8920. ``wide_keys`` layers, the ones whose
keys a per-model calibration finds most costly to quantize (``kivi_calibration.py``: copying a random
span from the context with one layer's keys quantized at a time), store keys at 4 bits. Each costs
``1 / layers`` bits per element on average (0.033 on the embedded model's 30 layers: kivi2 is 2.48
bits at 4k). The calibration runs once per model when an engine takes the compressor, and is cached.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...cache import KVLayer, QuantizedLayer, QuantSpec
from ...errors import ConfigError
from ..base import ModelAccess
from ..registry import register
from .base import Quantizer

PAPER = ("Liu et al., KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache, ICML 2024, "
         "arXiv:2402.02750")


@dataclass
class KIVI(Quantizer):
    """KIVI quantization: keys per channel, values per token, full-precision residual.

    bits: bits per code (2, 4 or 8), fixed by the registered name (kivi2, kivi4, kivi8)
    group: tokens per key group; values use groups of min(group, head_dim) channels
    residual: newest entries kept in full precision besides a group still filling
    sinks: oldest entries (attention sinks) kept in full precision
    rotate: quantize keys and values in a Hadamard-rotated basis (spreads outlier channels; no bytes)
    wide_keys: layers whose keys are stored at twice the bits, chosen by a per-model calibration
               (default 1 for kivi2, 0 otherwise; see the module docstring)
    """

    bits: int = field(default=2, init=False)
    group: int = 128
    residual: int = 0
    sinks: int = 4
    rotate: bool = True
    wide_keys: int = 0

    paper = PAPER

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group < 1:
            raise ConfigError(f"{self.name} group must be >= 1 tokens, got {self.group}")
        if self.residual < 0:
            raise ConfigError(f"{self.name} residual must be >= 0 tokens, got {self.residual}")
        if self.sinks < 0:
            raise ConfigError(f"{self.name} sinks must be >= 0 tokens, got {self.sinks}")
        if self.wide_keys < 0:
            raise ConfigError(f"{self.name} wide_keys must be >= 0 layers, got {self.wide_keys}")
        if self.wide_keys and self.bits == 8:
            raise ConfigError(f"{self.name} keys are already 8-bit; wide_keys applies to 2- and 4-bit KIVI")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group=self.group, residual=self.residual, sinks=self.sinks,
                         rotate=self.rotate)

    def params(self) -> str:
        wide = f", wide_keys={self.wide_keys}" if self.wide_keys else ""
        return f"group={self.group}, residual={self.residual}, sinks={self.sinks}, rotate={self.rotate}{wide}"

    def bind(self, model: ModelAccess) -> frozenset[int]:
        """The layers whose keys are stored wide (measured once per model, then read from the cache)."""
        if not self.wide_keys:
            return frozenset()
        from .kivi_calibration import ensure_sensitivity

        return frozenset(ensure_sensitivity(model, self.spec).most_sensitive(self.wide_keys))

    def quantize(self, layer: KVLayer, layer_idx: int = 0, bound: frozenset[int] | None = None) -> QuantizedLayer:
        """bound: the wide-key layers :meth:`bind` found (required when ``wide_keys``)."""
        if self.wide_keys and bound is None:
            raise ConfigError(
                f"{self.name} with wide_keys={self.wide_keys} needs the model's layer calibration: run it through "
                "an Engine (which binds it), pass compressor.bind(model) along, or use wide_keys=0"
            )
        spec = self.spec
        if bound and layer_idx in bound:
            spec = dataclasses.replace(spec, key_bits=2 * self.bits)
        return QuantizedLayer.from_layer(layer, spec)


@register
@dataclass
class KIVI2(KIVI):
    """KIVI at 2 bits per key and value code (four codes per byte)."""

    bits: int = field(default=2, init=False)
    wide_keys: int = 1
    name = "kivi2"


@register
@dataclass
class KIVI4(KIVI):
    """KIVI at 4 bits per key and value code (two codes per byte)."""

    bits: int = field(default=4, init=False)
    name = "kivi4"


@register
@dataclass
class KIVI8(KIVI):
    """KIVI at 8 bits per key and value code."""

    bits: int = field(default=8, init=False)
    name = "kivi8"
