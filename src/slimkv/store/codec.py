"""Tensors to bytes and back: the KV of a token chunk, or a whole compressed cache.

Contract: the engine encodes what it wants stored (:func:`encode_chunk`, :func:`encode_cache`), hands
the bytes to a tier stack, and decodes what comes back (:func:`decode_chunk`, :func:`decode_cache`).
Decoding verifies the checksum and every length, dtype and shape before touching the data and raises
:class:`~slimkv.store.errors.CorruptChunk` on any mismatch. Round trips are bit-exact for every
supported dtype (bfloat16 included); decoded tensors are on the CPU, contiguous and writable.

A blob is a :mod:`~slimkv.store.frame` envelope whose JSON header lists the tensors (name, dtype,
shape, byte offset into the body) and whose body is their raw little-endian bytes. There is no pickle:
a blob can only ever decode to tensors of the whitelisted dtypes.

Payloads::

    ChunkKV (kind "chunk"), per layer l:
        keys[l], values[l]: [kv_heads, tokens, head_dim]   any supported dtype
        positions[l]:       [kv_heads, tokens]             int32
    CachePayload (kind "cache"), per layer l (a compressed cache, rows may hold different counts):
        keys, values: [batch, kv_heads, L, head_dim]; positions: [batch, kv_heads, L] int32
        lengths:      [batch, kv_heads] int64, slots [0, length) of a row are valid
      only valid entries are stored (packed row after row); decoding zero-fills slots past a row's
      length, with L = the largest length of the layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import frame
from .errors import CorruptChunk

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)),
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a blob records for ``dtype`` (``"bfloat16"``); raises ``ValueError`` if unsupported."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored; supported: {sorted(_DTYPES)}")
    return name


# ---------------------------------------------------------------------- generic tensor blobs
def encode_tensors(kind: str, tensors: list[tuple[str, Tensor]], meta: dict[str, Any]) -> bytes:
    """One blob holding named tensors (in order) and a small JSON-able ``meta`` dict."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise NotImplementedError("the store codec writes little-endian data only")
    entries, parts, offset = [], [], 0
    for name, t in tensors:
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
        entries.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "offset": offset, "nbytes": int(data.nbytes)})
        parts.append(data)
        offset += data.nbytes
    return frame.pack({"kind": kind, "tensors": entries, "meta": meta}, parts)


def decode_tensors(blob: bytes, kind: str, check: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors by name and the meta dict of a blob of the given ``kind`` (checksum verified)."""
    header, body = frame.unpack(blob, check=check)
    if header.get("kind") != kind:
        raise CorruptChunk(f"stored entry is of kind {header.get('kind')!r}, expected {kind!r}")
    entries, meta = header.get("tensors"), header.get("meta")
    if not isinstance(entries, list) or not isinstance(meta, dict):
        raise CorruptChunk("stored entry header lacks its tensor list or meta")
    out: dict[str, Tensor] = {}
    for e in entries:
        try:
            name, dtype, shape = str(e["name"]), _DTYPES[e["dtype"]], [int(s) for s in e["shape"]]
            offset, nbytes = int(e["offset"]), int(e["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptChunk(f"stored entry has a malformed tensor record {e!r}") from exc
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or numel * itemsize != nbytes or offset < 0 \
                or offset + nbytes > body.nbytes:
            raise CorruptChunk(f"stored tensor {name!r} does not fit its declared shape or the body")
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = np.frombuffer(body, dtype=np.uint8, count=nbytes, offset=offset).copy()
        out[name] = torch.from_numpy(raw).view(dtype).reshape(shape)
    return out, meta


# ---------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class ChunkKV:
    """The KV of one chunk of tokens, every layer.

    keys, values: per layer ``[kv_heads, tokens, head_dim]`` (one dtype for all)
    positions:    per layer ``[kv_heads, tokens]`` int32 original token positions
    """

    keys: list[Tensor]
    values: list[Tensor]
    positions: list[Tensor]

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.values) == len(self.positions)):
            raise ValueError("ChunkKV needs as many values and positions as keys (one per layer)")
        for i, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions)):
            if k.dim() != 3 or k.shape != v.shape or tuple(p.shape) != tuple(k.shape[:2]):
                raise ValueError(
                    f"layer {i}: expected keys and values [kv_heads, tokens, head_dim] and positions "
                    f"[kv_heads, tokens], got {tuple(k.shape)}, {tuple(v.shape)}, {tuple(p.shape)}"
                )

    @property
    def tokens(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[1]


def encode_chunk(chunk: ChunkKV) -> bytes:
    tensors = []
    for i, (k, v, p) in enumerate(zip(chunk.keys, chunk.values, chunk.positions)):
        tensors += [(f"{i}.k", k), (f"{i}.v", v), (f"{i}.p", p.to(torch.int32))]
    return encode_tensors("chunk", tensors, {"layers": len(chunk.keys)})


def decode_chunk(blob: bytes, check: bool = True) -> ChunkKV:
    """check=False skips the checksum when the caller (a tier) has just verified the blob."""
    tensors, meta = decode_tensors(blob, "chunk", check)
    try:
        n = int(meta["layers"])
        return ChunkKV(
            keys=[tensors[f"{i}.k"] for i in range(n)],
            values=[tensors[f"{i}.v"] for i in range(n)],
            positions=[tensors[f"{i}.p"] for i in range(n)],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptChunk(f"stored chunk is inconsistent: {exc}") from exc


# ---------------------------------------------------------------------- compressed caches
@dataclass(frozen=True)
class LayerEntries:
    """One layer of a (possibly ragged) compressed cache; see the module docstring for shapes."""

    keys: Tensor  # [batch, kv_heads, L, head_dim]
    values: Tensor  # [batch, kv_heads, L, head_dim]
    positions: Tensor  # [batch, kv_heads, L] int32
    lengths: Tensor  # [batch, kv_heads] int64

    def __post_init__(self) -> None:
        k, v, p, n = self.keys, self.values, self.positions, self.lengths
        if k.dim() != 4 or k.shape != v.shape or p.shape != k.shape[:3] or n.shape != k.shape[:2]:
            raise ValueError(
                "LayerEntries expects keys/values [B, H, L, D], positions [B, H, L], lengths [B, H]; got "
                f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(p.shape)}, {tuple(n.shape)}"
            )
        if n.numel() and (int(n.min()) < 0 or int(n.max()) > k.shape[2]):
            raise ValueError(f"LayerEntries lengths must lie in [0, {k.shape[2]}]")

    def valid_mask(self) -> Tensor:
        """``[B, H, L]`` bool, true on slots ``[0, length)`` of every row."""
        idx = torch.arange(self.keys.shape[2], device=self.lengths.device)
        return idx < self.lengths[..., None]


@dataclass(frozen=True)
class CachePayload:
    """A whole compressed cache: its layers and, per sequence, the tokens processed (``seen``)."""

    layers: list[LayerEntries]
    seen: list[int] = field(default_factory=list)


def encode_cache(payload: CachePayload) -> bytes:
    tensors = []
    for i, layer in enumerate(payload.layers):
        mask = layer.valid_mask()  # [B, H, L]; boolean indexing packs valid slots row after row
        tensors += [(f"{i}.k", layer.keys[mask]), (f"{i}.v", layer.values[mask]),
                    (f"{i}.p", layer.positions[mask].to(torch.int32)),
                    (f"{i}.n", layer.lengths.to(torch.int64))]
    return encode_tensors("cache", tensors, {"layers": len(payload.layers), "seen": list(payload.seen)})


def decode_cache(blob: bytes, check: bool = True) -> CachePayload:
    """check=False skips the checksum when the caller (a tier) has just verified the blob."""
    tensors, meta = decode_tensors(blob, "cache", check)
    try:
        layers = []
        for i in range(int(meta["layers"])):
            keys, values, pos, lengths = (tensors[f"{i}.{s}"] for s in "kvpn")
            batch, heads = lengths.shape
            cap = int(lengths.max()) if lengths.numel() else 0
            mask = torch.arange(cap) < lengths[..., None]  # [B, H, L]
            if int(mask.sum()) != keys.shape[0] or keys.shape != values.shape or pos.shape != keys.shape[:1]:
                raise ValueError(f"layer {i}: packed entries do not match its lengths")
            k = keys.new_zeros(batch, heads, cap, keys.shape[-1])
            v = values.new_zeros(batch, heads, cap, values.shape[-1])
            p = pos.new_zeros(batch, heads, cap)
            k[mask], v[mask], p[mask] = keys, values, pos
            layers.append(LayerEntries(k, v, p, lengths))
        return CachePayload(layers=layers, seen=[int(s) for s in meta["seen"]])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CorruptChunk(f"stored cache is inconsistent: {exc}") from exc
