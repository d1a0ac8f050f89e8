"""CommVQ: additive vector quantization of keys and values with RoPE-commutative codebooks.

Paper: Li et al., "CommVQ: Commutative Vector Quantization for KV Cache Compression", ICML 2025,
arXiv:2506.18879.

Each entry of a KV head is stored as a float16 norm plus ``S`` one-byte stage codes of a residual
additive quantizer whose codewords are complex per RoPE channel pair, so they commute with the
rotary embedding: keys are coded *before* RoPE and attention logits can be computed from codes
(``cache/vq_codes.py``, ``cache/vq.py``). Values use the same additive quantizer (the paper codes
values with additive VQ as well; they need no RoPE). Codebooks are fitted per layer, KV head and
kind by EM on calibration KV of real offline text and cached per model
(``commvq_calibration.py``; ``slimkv calibrate commvq``).

Bits per element, for a head of ``D`` channels: ``S = (bits * D - 16) // 8`` stages (at least one),
so codes plus the norm take ``bits`` bits per element: ``commvq2`` at D = 64 has 14 stages (16 bytes
per entry and head = 2.0 bits per element), ``commvq1`` 6 stages (1.0 bit). Shared int16 positions
add 16 bits per token and the full-precision window of new entries its model-dtype bytes, both
counted; the codebooks are shared by every request of a model and not counted (30 layers x 3 heads
x 2 kinds x 14 stages x 32 codewords x 64 float32 values = 21 MB for the embedded model).

Differences from the paper: the paper predicts codes with a small learned encoder (and fine-tunes
the codebook); here codes are found by exhaustive greedy search per stage (256 combinations), no
training beyond the EM fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ...cache import KVLayer
from ...cache.vq import VQBooks, VQLayer
from ...errors import ConfigError
from ..base import ModelAccess
from ..registry import register
from .base import Quantizer
from .commvq_calibration import Calibration, load_or_fit

log = logging.getLogger(__name__)

PAPER = ("Li et al., CommVQ: Commutative Vector Quantization for KV Cache Compression, ICML 2025, "
         "arXiv:2506.18879")
NORM_BITS = 16


def stages_for(bits: int, head_dim: int) -> int:
    """One-byte stages per entry so that codes plus the float16 norm take ``bits`` bits per element."""
    return max(1, (bits * head_dim - NORM_BITS) // 8)


@dataclass
class CommVQ(Quantizer):
    """CommVQ: RoPE-commutative additive VQ of keys and values, codebooks fitted on real text.

    bits: target bits per element (2 or 1), fixed by the registered name (commvq2, commvq1)
    group: new entries coded together while decoding (they wait in full precision until then)
    window: newest entries always kept in full precision (model dtype, counted in bytes)
    tokens, iters: calibration tokens of real text and EM iterations per stage
    cache_dir: where codebooks are cached (default: ``<slimkv cache>/commvq``)
    """

    bits: int = field(default=2, init=False)
    group: int = 32
    window: int = 0
    tokens: int = 4096
    iters: int = 2
    cache_dir: str | None = None

    paper = PAPER

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group < 1:
            raise ConfigError(f"{self.name} group must be >= 1 tokens, got {self.group}")
        if self.window < 0:
            raise ConfigError(f"{self.name} window must be >= 0 tokens, got {self.window}")
        Calibration(stages=1, tokens=self.tokens, iters=self.iters)  # validates tokens and iters

    def params(self) -> str:
        return f"group={self.group}, window={self.window}, tokens={self.tokens}"

    def calibration(self, head_dim: int) -> Calibration:
        return Calibration(stages=stages_for(self.bits, head_dim), tokens=self.tokens, iters=self.iters)

    def bind(self, model: ModelAccess) -> list[VQBooks]:
        """This model's codebooks, per layer (loaded from the cache, or fitted the first time)."""
        adapter = model.adapter
        spec = adapter.spec
        calib = self.calibration(spec.head_dim)
        if calib.stages * 8 + NORM_BITS > self.bits * spec.head_dim:
            log.warning("%s: head_dim %d is too small for %d bit(s) per element with a float16 norm; "
                        "using one stage (%.2f bits per element)", self.name, spec.head_dim, self.bits,
                        (8 + NORM_BITS) / spec.head_dim)
        tokens = min(self.tokens, adapter.max_positions)
        if tokens != self.tokens:
            calib = Calibration(stages=calib.stages, tokens=tokens, iters=self.iters)
        data = load_or_fit(model, calib, Path(self.cache_dir) if self.cache_dir else None)
        inv_freq = adapter.rope_table()
        device = adapter.device
        return [
            VQBooks(*(data[f"{kind}_{part}"][i].float().to(device) for kind in "kv" for part in ("alpha", "beta")),
                    inv_freq=inv_freq[i].to(device), group=self.group, window=self.window)
            for i in range(spec.layers)
        ]

    def quantize(self, layer: KVLayer, layer_idx: int = 0, bound: list[VQBooks] | None = None) -> VQLayer:
        """bound: the model's codebooks (:meth:`bind`)."""
        if bound is None:
            raise ConfigError(f"{self.name} needs the codebooks of its model: run it through an Engine "
                              "(which binds it), or pass compressor.bind(model) along")
        return VQLayer.from_layer(layer, bound[layer_idx])


@register
@dataclass
class CommVQ2(CommVQ):
    """CommVQ at 2 bits per element (codes plus norm): 14 one-byte stages at head_dim 64."""

    bits: int = field(default=2, init=False)
    name = "commvq2"


@register
@dataclass
class CommVQ1(CommVQ):
    """CommVQ at 1 bit per element (codes plus norm): 6 one-byte stages at head_dim 64."""

    bits: int = field(default=1, init=False)
    name = "commvq1"
