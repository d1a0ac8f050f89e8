"""ZipVL-style mixed precision: the tokens that hold most of the attention keep more bits.

Paper: Y. He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification
and KV Cache Compression", arXiv:2410.08584.

Per layer, the attention of the last ``window`` prompt queries (as SnapKV observes them) gives every
entry a share of the attention mass (averaged over the queries and the query heads of a KV head). The
*important* entries are the smallest set holding ``share`` of that mass; the count is chosen per layer
- the largest any KV head of the layer needs, so the split adapts to how concentrated each layer's
attention is - and every KV head then keeps its own top entries. Important entries are quantized at
``high_bits``, the rest at ``low_bits`` (KIVI layout, ``cache/quantized.py``); the attention sinks
(first ``sinks`` entries) stay exact and count as covered mass. Both parts are real packed storage
(``cache/mixed.py``); the bits per element follow from how spread the attention is and are reported
by ``benchmarks/quant.py``. Only the prefill phase acts; decoded tokens join the low-precision part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...cache import CacheLayer, CacheSpec, QuantizedLayer, QuantSpec
from ...cache.mixed import MixedLayer
from ...cache.packing import BITS
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..eviction.snapkv import SnapKVCompressor, window_attention
from ..registry import register
from ..state import QueryWindow
from .base import Quantizer


def important_count(mass: Tensor, share: float, covered: Tensor | None = None) -> Tensor:
    """Per row, the fewest entries whose mass (plus ``covered``) reaches ``share`` of the total.

    mass: [..., L] non-negative; covered: [...] mass already held elsewhere (the sinks) or None.
    Returns int64 [...] in [0, L].
    """
    total = mass.sum(-1) + (0 if covered is None else covered)
    need = share * total - (0 if covered is None else covered)
    cum = mass.sort(dim=-1, descending=True).values.cumsum(-1)  # [..., L]
    # entries needed = how many prefix sums are still short of `need`, plus the one that reaches it
    count = (cum < need[..., None] * (1 - 1e-6)).sum(-1) + 1
    return torch.where(need > 0, count.clamp(max=mass.shape[-1]), torch.zeros_like(count))


@register
@dataclass
class ZipVL(Quantizer):
    """Mixed precision by attention mass: entries holding `share` of it at high bits, the rest at 2 bits.

    share: fraction of the observation window's attention mass the high-precision entries must hold
    high_bits, low_bits: bits of the important entries and of the rest (2, 4 or 8)
    window: prompt queries that measure the attention (SnapKV's observation window)
    group, residual, sinks, rotate: the KIVI layout of both parts (see kivi2)
    """

    share: float = 0.9
    high_bits: int = 4
    low_bits: int = 2
    window: int = 16
    group: int = 128
    residual: int = 0
    sinks: int = 4
    rotate: bool = True
    _votes: SnapKVCompressor = field(init=False, repr=False, compare=False)

    name = "zipvl"
    paper = ("He et al., ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and "
             "KV Cache Compression, arXiv:2410.08584")

    def __post_init__(self) -> None:
        super().__post_init__()  # (a ratio or budget is refused there: zipvl keeps every entry)
        if not 0.0 < self.share <= 1.0:
            raise ConfigError(f"zipvl share must be in (0, 1] (a fraction of the attention mass), got {self.share}")
        for label, bits in (("high_bits", self.high_bits), ("low_bits", self.low_bits)):
            if bits not in BITS:
                raise ConfigError(f"zipvl {label} must be one of {', '.join(map(str, BITS))}, got {bits}")
        if self.high_bits < self.low_bits:
            raise ConfigError(f"zipvl high_bits ({self.high_bits}) must be at least low_bits ({self.low_bits})")
        if self.window < 1 or self.group < 1 or self.residual < 0 or self.sinks < 0:
            raise ConfigError("zipvl window and group must be >= 1, residual and sinks >= 0")
        self._votes = SnapKVCompressor(window=self.window, kernel=1)
        self.bits = self.low_bits

    def params(self) -> str:
        return (f"share={self.share}, bits={self.high_bits}/{self.low_bits}, window={self.window}, "
                f"group={self.group}, residual={self.residual}, sinks={self.sinks}, rotate={self.rotate}")

    def spec(self, bits: int, sinks: int) -> QuantSpec:
        return QuantSpec(bits=bits, group=self.group, residual=self.residual if sinks else 0, sinks=sinks,
                         rotate=self.rotate)

    def recorders(self, phase: str) -> list[Compressor]:
        """SnapKV's observation window (shared with a SnapKV stage of the same window)."""
        return [self._votes] if self.active(phase) else []

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        return self._votes.state_bytes(spec, q_heads, tokens)

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        """Attention mass ``[B, H, L]`` of the window queries on every entry (mean over queries and group heads)."""
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        window = ctx.states.get(self._votes.state_key, QueryWindow)
        probs, _ = window_attention(layer, keys, positions, window)  # [B, H, G, w, L]
        return probs.mean(dim=(2, 3))

    def compress(self, layer: CacheLayer, ctx: ScoreContext, merger: Compressor | None = None) -> CacheLayer:
        """The :class:`MixedLayer` replacing ``layer``: important entries at ``high_bits``, the rest low."""
        if layer.quantized or not layer.initialized:
            return layer
        if not layer.uniform:
            raise ValueError("zipvl needs every row of a layer to hold the same number of entries")
        length = layer.max_length
        sinks = min(self.sinks, length)
        body = length - sinks - self.residual  # entries that can be quantized at either precision
        if body <= 0 or self.high_bits == self.low_bits:
            return MixedLayer(None, QuantizedLayer.from_layer(layer, self.spec(self.low_bits, self.sinks)))
        mass = self.score(layer, ctx)  # [B, H, L], entries in time order (sinks first)
        candidates = mass[..., sinks : sinks + body]
        count = int(important_count(candidates, self.share, covered=mass[..., :sinks].sum(-1)).max())
        if count == 0:
            return MixedLayer(None, QuantizedLayer.from_layer(layer, self.spec(self.low_bits, self.sinks)))
        top = candidates.topk(count, dim=-1).indices + sinks  # [B, H, count] slots
        chosen = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)
        rest = (~chosen).nonzero()[:, -1].view(*mass.shape[:2], length - count)  # [B, H, L - count] slots
        high, low = layer.clone(), layer.clone()
        high.keep(top.sort(dim=-1).values)
        low.keep(rest)
        high_q = QuantizedLayer.from_layer(high, self.spec(self.high_bits, 0))
        return MixedLayer(high_q, QuantizedLayer.from_layer(low, self.spec(self.low_bits, self.sinks)))

