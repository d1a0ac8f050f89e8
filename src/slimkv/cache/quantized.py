"""A quantized layer: KIVI-style packed codes for old entries, a small full-precision residual for new ones.

Contract (the same calls the engine makes on a :class:`~slimkv.cache.KVLayer`):

1. A quantizer (``compressors/quantization``) builds it once from a dense layer after prefill and
   eviction: :meth:`QuantizedLayer.from_layer`. The dense layer's entries must be in time order
   (they are: appends and ``keep`` preserve slot order), every row holding the same number.
2. ``append`` adds new entries to the full-precision residual; complete groups of the residual's
   oldest entries are quantized at the start of the *next* append (the newest ``ROLLBACK_SLACK``
   always stay, so lossless decoding can roll drafted tokens back), and a token is always attended
   in full precision during the pass that created it.
3. ``attend`` reads the layer: the fused kernel (``cache/kernels``) when every entry is visible to
   every query (decoding), otherwise the layer is dequantized on the fly and read like a dense one.
   Either way only this layer is ever expanded, never the whole cache.
4. ``nbytes`` counts every allocated byte: packed codes, float16 scales and zero points, positions,
   lengths, the sinks and the residual (:class:`KVLayer` s grown exactly, without free slots).

Two options of :class:`QuantSpec` protect 2-bit caches (measured in ``benchmarks/results/quant.md``):
``sinks`` keeps the first entries of every row (attention sinks, which draw most of the attention
mass) exactly, in a small dense layer; ``rotate`` stores the quantized part in a rotated basis
(``cache/rotation.py``): codes of ``K R`` and ``V R``, so reads rotate the query and un-rotate the
output instead of ever un-rotating the cache.

What it shares with CommVQ's layer (growing through the residual, rollback, refusing eviction) is in
``cache/coded.py``. Eviction does not act on quantized entries (``keep`` and ``replace`` refuse):
evict first, then quantize what is kept (``compressors/compose.py``).

Layout (``Q`` quantized entries per row, ``NG`` key groups, ``PK = head_dim * key_bits // 8``,
``PV = head_dim * bits // 8``)::

    k_codes:          [batch, kv_heads, Q, PK]            uint8, packed (``cache/packing.py``)
    v_codes:          [batch, kv_heads, Q, PV]            uint8, packed
    k_scale, k_zero:  [batch, kv_heads, NG, head_dim]     float16, per channel over ``group`` entries
    v_scale, v_zero:  [batch, kv_heads, Q, head_dim / VG] float16, per entry over ``VG`` channels
    positions:        [batch, 1 or kv_heads, Q]           int16 (int32 past 32767), one row when
                                                          every head holds the same positions
    residual:         KVLayer of the newest entries in the model dtype
    sinks:            KVLayer of the ``spec.sinks`` oldest entries in the model dtype, or None

Key groups are aligned to the *newest* quantized entry: at conversion the oldest group is the
short one (``k_pad`` missing entries at its front), so right after prefill the full-precision part is
exactly ``residual`` entries (KIVI leaves the prompt's last ``n mod group`` keys in full precision
instead; aligning the other way makes the cost after prefill predictable). Later groups come full
from the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels
from .attention import AttentionMeta
from .coded import ROLLBACK_SLACK, CodedLayer, compact_positions, dense_slice, join_positions
from .layer import KVLayer
from .packing import PARAM_DTYPE, check_bits, pack, quantize, unpack
from .rotation import rotate, unrotate

__all__ = ["ROLLBACK_SLACK", "QuantSpec", "QuantizedLayer"]


@dataclass(frozen=True)
class QuantSpec:
    """How a layer is quantized.

    bits: bits per code (2, 4 or 8)
    key_bits: bits per key code when keys get more than values (None: ``bits``); KIVI widens the
              keys of the few layers a calibration finds most sensitive (``compressors/quantization``)
    group: entries per key group (keys are quantized per channel over ``group`` consecutive entries);
           values are quantized per entry in groups of ``min(group, head_dim)`` channels
    residual: newest entries always kept in full precision (besides a group still filling)
    sinks: oldest entries of each row kept in full precision (attention sinks)
    rotate: quantize keys and values in a rotated basis (``cache/rotation.py``)
    """

    bits: int = 2
    group: int = 128
    residual: int = 0
    sinks: int = 0
    rotate: bool = False
    key_bits: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.key_bits is not None:
            check_bits(self.key_bits)
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    @property
    def kbits(self) -> int:
        """Bits per key code."""
        return self.bits if self.key_bits is None else self.key_bits

    def value_group(self, head_dim: int) -> int:
        """Channels per value group: ``min(group, head_dim)``, or the whole head if that does not divide it."""
        g = min(self.group, head_dim)
        return g if head_dim % g == 0 else head_dim


class QuantizedLayer(CodedLayer):
    """KIVI-style quantized storage of one attention layer (see the module docstring)."""

    def __init__(self, spec: QuantSpec, residual: KVLayer, dtype: torch.dtype) -> None:
        super().__init__(residual, dtype)
        self.spec = spec
        self.k_pad = 0
        self.k_codes = self.v_codes = self.k_scale = self.k_zero = self.v_scale = self.v_zero = None
        self.sinks: KVLayer | None = None

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_layer(cls, layer: KVLayer, spec: QuantSpec) -> QuantizedLayer:
        """Quantize all but the newest ``spec.residual`` entries of a dense layer (per-entry state is dropped)."""
        if not layer.initialized:
            raise ValueError("cannot quantize an empty layer; quantize after prefill")
        if not layer.uniform:
            raise ValueError(
                "quantization needs every row of a layer to hold the same number of entries; "
                "quantize each sequence's cache before stacking a batch"
            )
        keys, values, positions = layer.view()  # [B, H, L, D], [B, H, L, D], [B, H, L]
        dim = keys.shape[-1]
        for bits in {spec.bits, spec.kbits}:
            if dim % (8 // bits):
                raise ValueError(f"{bits}-bit packing needs head_dim divisible by {8 // bits}, got {dim}")
        n = keys.shape[2]
        sinks = min(spec.sinks, max(0, n - spec.residual))
        quantized = max(0, n - spec.residual - sinks)
        residual = KVLayer()
        residual.scale = layer.scale
        if sinks + quantized < n:
            residual = dense_slice(keys, values, positions, sinks + quantized, n, layer.scale)
        out = cls(spec, residual, keys.dtype)
        if sinks:
            out.sinks = dense_slice(keys, values, positions, 0, sinks, layer.scale)
        out.k_pad = -quantized % spec.group
        body = slice(sinks, sinks + quantized)
        out._set_quantized(keys[:, :, body], values[:, :, body], positions[:, :, body], out.k_pad)
        out.lengths = layer.lengths.clone()  # type: ignore[union-attr]
        return out

    def _set_quantized(self, keys: Tensor, values: Tensor, positions: Tensor, pad: int) -> None:
        if self.spec.rotate:
            keys, values = rotate(keys.float()), rotate(values.float())
        self.k_codes, self.k_scale, self.k_zero = _quantize_keys(keys, self.spec, pad)
        self.v_codes, self.v_scale, self.v_zero = _quantize_values(values, self.spec)
        self.positions_q = compact_positions(positions)

    def _flush(self) -> None:
        """Quantize the residual's oldest complete groups (keeping at least ``spec.residual`` entries)."""
        res, spec = self.residual, self.spec
        groups = (res.max_length - spec.residual - ROLLBACK_SLACK) // spec.group if res.initialized else 0
        if groups <= 0:
            return
        take = groups * spec.group
        keys, values, positions = res.view()
        keys, values = keys[:, :, :take], values[:, :, :take]
        if spec.rotate:
            keys, values = rotate(keys.float()), rotate(values.float())
        k = _quantize_keys(keys, spec, 0)
        v = _quantize_values(values, spec)
        assert self.k_codes is not None and self.v_codes is not None and self.positions_q is not None
        self.k_codes, self.k_scale, self.k_zero = (torch.cat([a, b], dim=2) for a, b in zip(
            (self.k_codes, self.k_scale, self.k_zero), k))
        self.v_codes, self.v_scale, self.v_zero = (torch.cat([a, b], dim=2) for a, b in zip(
            (self.v_codes, self.v_scale, self.v_zero), v))
        self.positions_q = join_positions(self.positions_q, positions[:, :, :take])
        rest = res.max_length - take
        idx = torch.arange(take, res.max_length, device=keys.device).expand(*keys.shape[:2], rest)
        res.keep(idx)

    # ------------------------------------------------------------------ shape and size
    @property
    def quantized_length(self) -> int:
        return 0 if self.k_codes is None else self.k_codes.shape[2]

    @property
    def sink_length(self) -> int:
        return 0 if self.sinks is None else self.sinks.max_length

    @property
    def prefix_length(self) -> int:
        return self.sink_length

    def nbytes(self) -> int:
        """Every byte held: packed codes, scales, zero points, positions, lengths, residual, state."""
        tensors = [self.k_codes, self.v_codes, self.k_scale, self.k_zero, self.v_scale, self.v_zero,
                   self.positions_q, self.lengths]
        own = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return own + self.residual.nbytes() + (0 if self.sinks is None else self.sinks.nbytes())

    @property
    def positions(self) -> Tensor:
        """int32 ``[B, H, L]`` positions of all entries: sinks, quantized, residual."""
        assert self.positions_q is not None and self.k_codes is not None
        batch, heads = self.k_codes.shape[:2]
        pos = self.positions_q.to(torch.int32).expand(batch, heads, -1)
        head = [self.sinks.view()[2]] if self.sink_length else []
        tail = [self.residual.view()[2]] if self.residual.max_length else []
        return torch.cat([*head, pos, *tail], dim=2)

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """Dequantized keys, values ``[B, H, L, D]`` and positions ``[B, H, L]`` of this layer.

        Materialises the layer in its model dtype: for tools and tests; attention does this only on
        its slow path (prefill chunks, sliding windows), one layer at a time.
        """
        keys, values = self.dequantize()
        if self.sink_length:
            sk, sv, _ = self.sinks.view()
            keys, values = torch.cat([sk, keys], dim=2), torch.cat([sv, values], dim=2)
        if self.residual.max_length:
            rk, rv, _ = self.residual.view()
            keys, values = torch.cat([keys, rk], dim=2), torch.cat([values, rv], dim=2)
        return keys, values, self.positions

    def dequantize(self) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, H, Q, D]`` of the quantized entries, in the model dtype."""
        assert self.k_codes is not None and self.v_codes is not None
        spec, q = self.spec, self.quantized_length
        keys = unpack(self.k_codes, spec.kbits).float()  # [B, H, Q, D]
        k_scale = self.k_scale.float().repeat_interleave(spec.group, dim=2)[:, :, self.k_pad : self.k_pad + q]
        k_zero = self.k_zero.float().repeat_interleave(spec.group, dim=2)[:, :, self.k_pad : self.k_pad + q]
        keys = keys * k_scale + k_zero
        batch, heads, _, dim = keys.shape
        vg = spec.value_group(dim)
        values = unpack(self.v_codes, spec.bits).float().view(batch, heads, q, dim // vg, vg)
        values = (values * self.v_scale.float()[..., None] + self.v_zero.float()[..., None]).view(batch, heads, q, dim)
        if spec.rotate:
            keys, values = unrotate(keys), unrotate(values)
        return keys.to(self.dtype), values.to(self.dtype)

    # ------------------------------------------------------------------ reading
    def _fast_attention(self, query: Tensor, meta: AttentionMeta) -> Tensor | None:
        """The fused kernel (``cache/kernels``) for one query token seeing every entry, when it can run."""
        assert self.positions_q is not None
        oldest = self.sinks.view()[2] if self.sink_length else self.positions_q  # type: ignore[union-attr]
        if self.simple_read(query, meta, oldest) and kernels.available(query, self):
            return kernels.decode_attention(query, self, meta.scale)
        return None

    def clone(self) -> QuantizedLayer:
        out = QuantizedLayer(self.spec, self.residual.clone(), self.dtype)
        out.scale, out.k_pad = self.scale, self.k_pad
        out.sinks = None if self.sinks is None else self.sinks.clone()
        for name in ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "positions_q", "lengths"):
            setattr(out, name, getattr(self, name).clone())
        return out


# ---------------------------------------------------------------------- helpers
def _quantize_keys(keys: Tensor, spec: QuantSpec, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel quantization of keys ``[B, H, n, D]`` over groups of ``spec.group`` entries.

    ``pad`` virtual entries (copies of the first, so the group's range is unchanged) complete the
    first group. Returns packed codes ``[B, H, n, P]`` and scale, zero ``[B, H, NG, D]`` float16.
    """
    batch, heads, n, dim = keys.shape
    if n == 0:
        empty = keys.new_zeros(batch, heads, 0, dim, dtype=PARAM_DTYPE)
        return keys.new_zeros(batch, heads, 0, dim * spec.kbits // 8, dtype=torch.uint8), empty, empty.clone()
    if pad:
        keys = torch.cat([keys[:, :, :1].expand(batch, heads, pad, dim), keys], dim=2)
    groups = keys.shape[2] // spec.group
    grouped = keys.reshape(batch, heads, groups, spec.group, dim).transpose(3, 4)  # [B, H, NG, D, G]
    q = quantize(grouped, spec.kbits)
    codes = q.codes.transpose(3, 4).reshape(batch, heads, groups * spec.group, dim)[:, :, pad:]
    return pack(codes, spec.kbits), q.scale[..., 0], q.zero[..., 0]


def _quantize_values(values: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Per-entry quantization of values ``[B, H, n, D]`` in groups of channels.

    Returns packed codes ``[B, H, n, P]`` and scale, zero ``[B, H, n, D / VG]`` float16.
    """
    batch, heads, n, dim = values.shape
    vg = spec.value_group(dim)
    q = quantize(values.reshape(batch, heads, n, dim // vg, vg), spec.bits)
    return pack(q.codes.reshape(batch, heads, n, dim), spec.bits), q.scale[..., 0], q.zero[..., 0]
