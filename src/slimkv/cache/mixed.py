"""A mixed-precision layer: the same entries split between quantized parts of different bit widths.

Contract (the calls a :class:`~slimkv.cache.QuantizedLayer` answers, see ``cache/quantized.py``):
a quantizer (ZipVL, ``compressors/quantization/zipvl.py``) builds it once after prefill from two
quantized layers holding disjoint entries of the same rows - ``high`` (important entries, more bits)
and ``low`` (everything else, e.g. 2 bits, with the attention sinks and the full-precision residual).
New entries are appended to ``low``, which quantizes them as its groups fill; rollbacks truncate
``low`` only. ``attend`` reads the union: entries are matched by position, so the order of the two
parts does not matter. ``nbytes`` is the sum of both parts (every byte held).

Layout::

    high: QuantizedLayer, [batch, kv_heads, H] entries (``H`` the same in every row), or None
    low:  QuantizedLayer, [batch, kv_heads, L - H] entries
    lengths: [batch, kv_heads] int64, entries of each row (both parts)

Decoding reads the union through the dequantizing path of ``attend_rows`` (one layer expanded at a
time), not the fused kernel, which reads one bit width per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import AttentionMeta, attend_rows
from .protocol import CacheLayer
from .quantized import QuantizedLayer


class MixedLayer(CacheLayer):
    """Entries of one attention layer held at two precisions (see the module docstring)."""

    quantized = True

    def __init__(self, high: QuantizedLayer | None, low: QuantizedLayer) -> None:
        self.high, self.low = high, low
        self.dtype = low.dtype
        self.scale = low.scale
        assert low.lengths is not None
        self.lengths = low.lengths.clone() + (0 if high is None else high.lengths)  # type: ignore[operator]

    @property
    def parts(self) -> list[QuantizedLayer]:
        return [p for p in (self.high, self.low) if p is not None]

    @property
    def high_length(self) -> int:
        return 0 if self.high is None else self.high.max_length

    # ------------------------------------------------------------------ shape and size
    @property
    def initialized(self) -> bool:
        return True

    @property
    def max_length(self) -> int:
        return sum(p.max_length for p in self.parts)

    @property
    def capacity(self) -> int:
        return sum(p.capacity for p in self.parts)

    @property
    def uniform(self) -> bool:
        return True

    def entries(self) -> int:
        return int(self.lengths.sum())

    def nbytes(self) -> int:
        """Every byte held by both parts (codes, scales, zero points, positions, sinks, residual)."""
        return sum(p.nbytes() for p in self.parts)

    @property
    def positions(self) -> Tensor:
        """int32 ``[B, H, L]``: the high part's entries, then the low part's."""
        return torch.cat([p.positions for p in self.parts], dim=2)

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """Dequantized keys, values ``[B, H, L, D]`` and positions ``[B, H, L]`` (high part first)."""
        views = [p.view() for p in self.parts]
        return tuple(torch.cat([v[i] for v in views], dim=2) for i in range(3))  # type: ignore[return-value]

    def valid_mask(self) -> Tensor:
        return torch.ones(*self.lengths.shape, self.max_length, dtype=torch.bool, device=self.lengths.device)

    # ------------------------------------------------------------------ writing
    def reserve(self, capacity: int) -> None:
        self.low.reserve(max(0, capacity - self.high_length))

    def growth_bytes(self, tokens: int, cap: int | None = None) -> int:
        return self.low.growth_bytes(tokens)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor, exact: bool = False,
               cap: int | None = None) -> None:
        """New entries ``[B, H, T, D]`` (positions ``[B, T]``) join the low-precision part."""
        self.low.append(keys, values, positions)
        self.lengths = self.lengths + keys.shape[2]

    def truncate(self, lengths: Tensor) -> None:
        """Speculative rollback: only the newest entries (of the low part's residual) are dropped."""
        self.low.truncate(lengths - self.high_length)
        self.lengths = lengths.to(self.lengths.device, torch.int64).clone()

    # ------------------------------------------------------------------ reading
    def attend(self, query: Tensor, meta: AttentionMeta) -> tuple[Tensor, Tensor | None]:
        """Attention of new queries ``[B, Hq, T, D]`` over both parts (see ``CacheLayer.attend``)."""
        keys, values, positions = self.view()
        return attend_rows(query, keys, values, positions, meta)

    def clone(self) -> MixedLayer:
        return MixedLayer(None if self.high is None else self.high.clone(), self.low.clone())
