"""A CommVQ layer: keys and values as one-byte additive-VQ stage codes plus a float16 norm per entry.

Contract (the calls the engine makes on a :class:`~slimkv.cache.KVLayer`):

1. The CommVQ quantizer (``compressors/quantization/commvq.py``) builds it once from a dense layer
   after prefill and eviction (:meth:`VQLayer.from_layer`). Keys arrive rotated by RoPE; they are
   rotated back to their pre-RoPE form with the model's frequencies (``ModelAdapter.rope_table``) and coded
   there, so the stored codes do not depend on position (the codebooks commute with RoPE).
2. ``append`` adds new entries to a full-precision residual; at the next append, residual entries
   beyond the newest ``window + ROLLBACK_SLACK`` are coded in blocks of ``group`` (a token is always
   attended in full precision during the pass that created it; rollbacks only drop residual entries).
3. ``attend`` decodes this layer only, never the whole cache: for one new query token the logits
   come from the decoded keys rotated at their positions, and the attention-weighted values are
   computed on codes (weights summed per codeword, then one product with the codebook); otherwise
   the layer is decoded and read like a dense one.
4. ``nbytes`` counts every byte the layer holds: codes, norms, positions, lengths and the residual.
   The codebooks are shared by every request of a model and are not counted (``VQBooks``).

Layout (``Q`` coded entries per row, ``S`` stages)::

    k_codes, v_codes: [batch, kv_heads, Q, S]       uint8, one byte per stage (``cache/vq_codes.py``)
    k_norm, v_norm:   [batch, kv_heads, Q]          float16
    positions_q:      [batch, 1 or kv_heads, Q]     int16 (int32 past 32767)
    residual:         KVLayer of the newest entries in the model dtype
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import AttentionMeta
from .coded import ROLLBACK_SLACK, CodedLayer, compact_positions, dense_slice, join_positions
from .layer import KVLayer
from .vq_codes import HALF, decode, decode_unit, encode, rope, rotate_half, unpack_codes


@dataclass(frozen=True)
class VQBooks:
    """One layer's codebooks (shared, read-only) and the RoPE frequencies of its keys.

    k_alpha, k_beta, v_alpha, v_beta: [kv_heads, S, HALF, head_dim] float32
    inv_freq: [head_dim / 2] float32
    group: entries coded together while decoding; window: newest entries always in full precision
    """

    k_alpha: Tensor
    k_beta: Tensor
    v_alpha: Tensor
    v_beta: Tensor
    inv_freq: Tensor
    group: int = 32
    window: int = 0

    @property
    def stages(self) -> int:
        return self.k_alpha.shape[1]

    def __reduce__(self) -> tuple:
        """A parked cache (``engine/pool.py``) refers to the shared codebooks instead of copying them."""
        token = self.__dict__.get("_token")
        if token is None:
            token = next(_TOKENS)
            object.__setattr__(self, "_token", token)
            _SHARED[token] = self
        return (_shared_books, (token,))


_SHARED: weakref.WeakValueDictionary[int, VQBooks] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


def _shared_books(token: int) -> VQBooks:
    try:
        return _SHARED[token]
    except KeyError:
        raise RuntimeError("a parked CommVQ cache outlived its codebooks (they are shared, never copied)") from None


def _by_head(x: Tensor) -> Tensor:
    """[B, H, N, D] -> [H, B*N, D] (codebooks are per head)."""
    b, h, n, d = x.shape
    return x.transpose(0, 1).reshape(h, b * n, d)


def _from_head(x: Tensor, batch: int) -> Tensor:
    """[H, B*N, ...] -> [B, H, N, ...]."""
    h, bn = x.shape[:2]
    return x.reshape(h, batch, bn // batch, *x.shape[2:]).transpose(0, 1)


class VQLayer(CodedLayer):
    """CommVQ storage of one attention layer (see the module docstring)."""

    def __init__(self, books: VQBooks, residual: KVLayer, dtype: torch.dtype) -> None:
        super().__init__(residual, dtype)
        self.books = books
        self.k_codes = self.v_codes = self.k_norm = self.v_norm = None

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_layer(cls, layer: KVLayer, books: VQBooks) -> VQLayer:
        """Code all but the newest ``books.window`` entries of a dense layer (in time order, uniform rows)."""
        if not layer.initialized:
            raise ValueError("cannot quantize an empty layer; quantize after prefill")
        if not layer.uniform:
            raise ValueError("CommVQ needs every row of a layer to hold the same number of entries; "
                             "quantize each sequence's cache before stacking a batch")
        keys, values, positions = layer.view()  # [B, H, L, D], [B, H, L, D], [B, H, L]
        n = keys.shape[2]
        coded = max(0, n - books.window)
        residual = KVLayer()
        residual.scale = layer.scale
        if coded < n:
            residual = dense_slice(keys, values, positions, coded, n, layer.scale)
        out = cls(books, residual, keys.dtype)
        out.k_codes, out.k_norm, out.v_codes, out.v_norm = out._encode(
            keys[:, :, :coded], values[:, :, :coded], positions[:, :, :coded])
        out.positions_q = compact_positions(positions[:, :, :coded])
        out.lengths = layer.lengths.clone()  # type: ignore[union-attr]
        return out

    def _encode(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Codes and norms of entries ``[B, H, n, D]``; keys are rotated back to before RoPE first."""
        bk, batch = self.books, keys.shape[0]
        plain = rope(keys.float(), positions, -bk.inv_freq)  # [B, H, n, D] pre-RoPE keys
        k_codes, k_norm = encode(_by_head(plain), bk.k_alpha, bk.k_beta)
        v_codes, v_norm = encode(_by_head(values.float()), bk.v_alpha, bk.v_beta)
        return (_from_head(k_codes, batch), _from_head(k_norm, batch),
                _from_head(v_codes, batch), _from_head(v_norm, batch))

    def _flush(self) -> None:
        """Code the residual's oldest entries in blocks of ``group`` (keeping the newest ones)."""
        res, bk = self.residual, self.books
        blocks = (res.max_length - bk.window - ROLLBACK_SLACK) // bk.group if res.initialized else 0
        if blocks <= 0:
            return
        take = blocks * bk.group
        keys, values, positions = res.view()
        k, kn, v, vn = self._encode(keys[:, :, :take], values[:, :, :take], positions[:, :, :take])
        self.k_codes, self.k_norm = torch.cat([self.k_codes, k], 2), torch.cat([self.k_norm, kn], 2)
        self.v_codes, self.v_norm = torch.cat([self.v_codes, v], 2), torch.cat([self.v_norm, vn], 2)
        self.positions_q = join_positions(self.positions_q, positions[:, :, :take])
        rest = res.max_length - take
        res.keep(torch.arange(take, res.max_length, device=keys.device).expand(*keys.shape[:2], rest))

    # ------------------------------------------------------------------ shape and size
    @property
    def quantized_length(self) -> int:
        return 0 if self.k_codes is None else self.k_codes.shape[2]

    def nbytes(self) -> int:
        """Every byte held: codes, norms, positions, lengths, residual (the shared codebooks are not)."""
        tensors = [self.k_codes, self.v_codes, self.k_norm, self.v_norm, self.positions_q, self.lengths]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + self.residual.nbytes()

    @property
    def positions(self) -> Tensor:
        """int32 ``[B, H, L]`` positions, coded entries first, residual after."""
        assert self.positions_q is not None and self.k_codes is not None
        pos = self.positions_q.to(torch.int32).expand(*self.k_codes.shape[:2], -1)
        if self.residual.max_length:
            pos = torch.cat([pos, self.residual.view()[2]], dim=2)
        return pos

    def dequantize(self) -> tuple[Tensor, Tensor]:
        """Keys (RoPE applied at their positions) and values ``[B, H, Q, D]`` of the coded entries."""
        bk, batch = self.books, self.k_codes.shape[0]
        plain = _from_head(decode(_by_head(self.k_codes), _by_head(self.k_norm[..., None])[..., 0],
                                  bk.k_alpha, bk.k_beta), batch)
        keys = rope(plain, self.positions_q.to(torch.int32).expand(*self.k_codes.shape[:3]), bk.inv_freq)
        values = _from_head(decode(_by_head(self.v_codes), _by_head(self.v_norm[..., None])[..., 0],
                                   bk.v_alpha, bk.v_beta), batch)
        return keys.to(self.dtype), values.to(self.dtype)

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """Decoded keys, values ``[B, H, L, D]`` and positions ``[B, H, L]`` (this layer only)."""
        keys, values = self.dequantize()
        if self.residual.max_length:
            rk, rv, _ = self.residual.view()
            keys, values = torch.cat([keys, rk], dim=2), torch.cat([values, rv], dim=2)
        return keys, values, self.positions

    # ------------------------------------------------------------------ reading
    def _fast_attention(self, query: Tensor, meta: AttentionMeta) -> Tensor | None:
        """Attention on codes for one query token seeing every entry (see :meth:`_decode_attention`)."""
        assert self.positions_q is not None
        return self._decode_attention(query, meta.scale) if self.simple_read(query, meta, self.positions_q) else None

    def _decode_attention(self, query: Tensor, scale: float) -> Tensor:
        """One query token seeing every entry: ``[B, Hq, 1, D]`` -> ``[B, Hq, 1, D]``.

        Logits over coded keys from the decoded, rotated keys of this layer; the weighted sum of coded
        values on codes: ``sum_t p_t norm_t (alpha[A_t] + j beta[B_t])`` is the per-codeword weight
        totals times the codebook (``S * HALF`` weights per head instead of ``Q`` vectors).
        """
        bk = self.books
        batch, q_heads, _, dim = query.shape
        heads = self.k_codes.shape[1]
        groups = q_heads // heads
        q = query.float().reshape(batch, heads, groups, dim)  # [B, H, G, D]
        keys, _ = self._coded_keys()
        logits = [q @ keys.transpose(-1, -2)]  # [B, H, G, Q]
        if self.residual.max_length:
            rk, rv, _ = self.residual.view()
            logits.append(q @ rk.float().transpose(-1, -2))
        probs = torch.softmax(torch.cat(logits, -1) * scale, dim=-1)
        coded = self.quantized_length
        weights = probs[..., :coded] * self.v_norm.float()[:, :, None, :]  # [B, H, G, Q]
        a, b = unpack_codes(self.v_codes)  # [B, H, Q, S]
        stages = a.shape[-1]
        offset = torch.arange(stages, device=a.device) * HALF
        totals_a = torch.zeros(batch, heads, groups, stages * HALF, device=q.device)
        totals_b = torch.zeros_like(totals_a)
        flat = lambda i: (i + offset).flatten(2)[:, :, None].expand(batch, heads, groups, -1)  # noqa: E731
        w = weights[..., None].expand(*weights.shape, stages).flatten(3)
        totals_a.scatter_add_(3, flat(a), w)
        totals_b.scatter_add_(3, flat(b), w)
        va = bk.v_alpha.reshape(heads, stages * HALF, dim)[None]  # [1, H, S*HALF, D]
        vb = bk.v_beta.reshape(heads, stages * HALF, dim)[None]
        out = totals_a @ va + rotate_half(totals_b @ vb)  # [B, H, G, D]
        if self.residual.max_length:
            out = out + probs[..., coded:] @ rv.float()
        return out.to(query.dtype).reshape(batch, q_heads, 1, dim)

    def _coded_keys(self) -> tuple[Tensor, Tensor]:
        """Rotated keys ``[B, H, Q, D]`` float32 and positions of the coded entries."""
        bk, batch = self.books, self.k_codes.shape[0]
        unit = _from_head(decode_unit(_by_head(self.k_codes), bk.k_alpha, bk.k_beta), batch)
        pos = self.positions_q.to(torch.int32).expand(*self.k_codes.shape[:3])
        return rope(unit * self.k_norm.float()[..., None], pos, bk.inv_freq), pos

    def clone(self) -> VQLayer:
        out = VQLayer(self.books, self.residual.clone(), self.dtype)
        out.scale = self.scale
        for name in ("k_codes", "v_codes", "k_norm", "v_norm", "positions_q", "lengths"):
            setattr(out, name, getattr(self, name).clone())
        return out
