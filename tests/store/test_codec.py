"""Codec: bit-exact round trips, ragged compressed caches, and corruption always detected."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import CacheSpec, SlimCache
from slimkv.store import (
    CachePayload,
    ChunkKV,
    CorruptChunk,
    LayerEntries,
    cache_to_payload,
    decode_cache,
    decode_chunk,
    encode_cache,
    encode_chunk,
    payload_to_cache,
)

from .helpers import chunks_equal, make_chunk

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunk_round_trip_is_bit_exact(dtype):
    chunk = make_chunk(seed=1, layers=3, heads=2, tokens=5, dim=8, dtype=dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    chunk.keys[0][0, 0, :4] = special  # NaN payloads and signed zero must survive too
    out = decode_chunk(encode_chunk(chunk))
    assert len(out.keys) == 3 and out.tokens == 5
    for a, b in zip(chunk.keys + chunk.values, out.keys + out.values):
        assert b.dtype == dtype and b.shape == a.shape
        assert torch.equal(a.view(BITS[dtype]), b.view(BITS[dtype]))
    assert all(torch.equal(a, b) and b.dtype == torch.int32 for a, b in zip(chunk.positions, out.positions))


def test_decoded_tensors_are_independent_and_writable():
    blob = encode_chunk(make_chunk())
    out = decode_chunk(blob)
    out.keys[0].add_(1.0)  # must not touch the blob or warn about read-only memory
    assert chunks_equal(decode_chunk(blob), make_chunk())


def _ragged_layer(seed: int, lengths: list[list[int]], dim: int = 8, dtype=torch.bfloat16) -> LayerEntries:
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(lengths, dtype=torch.int64)  # [B, H]
    cap = int(n.max())
    keys = torch.randn(*n.shape, cap, dim, generator=g).to(dtype)
    values = torch.randn(*n.shape, cap, dim, generator=g).to(dtype)
    positions = torch.randint(0, 1000, (*n.shape, cap), generator=g, dtype=torch.int32)
    return LayerEntries(keys, values, positions, n)


def test_ragged_cache_round_trip_keeps_exactly_the_valid_entries():
    layers = [_ragged_layer(0, [[3, 5], [0, 2]]), _ragged_layer(1, [[4, 4], [4, 1]])]
    payload = CachePayload(layers, seen=[9, 7])
    blob = encode_cache(payload)
    out = decode_cache(blob)
    assert out.seen == [9, 7] and len(out.layers) == 2
    for a, b in zip(payload.layers, out.layers):
        assert torch.equal(a.lengths, b.lengths) and b.keys.shape == a.keys.shape
        mask = a.valid_mask()
        for x, y in ((a.keys, b.keys), (a.values, b.values), (a.positions, b.positions)):
            assert torch.equal(x[mask], y[mask]) and not y[~mask].any()  # free slots come back as zeros
    # only valid entries are stored: 15 + 13 entries of 8 bf16 keys and values, plus int32 positions
    assert len(blob) < (15 + 13) * (2 * 8 * 2 + 4) + 2000


def test_slim_cache_round_trip_through_the_store_layout():
    spec = CacheSpec(layers=2, kv_heads=2, head_dim=8, dtype=torch.float32)
    cache = SlimCache(spec)
    g = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        layer.append(torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g),
                     torch.arange(6)[None], exact=True)
        keep = torch.tensor([[[0, 2, 5, 5], [1, 3, 4, 5]]])  # ragged: head 0 keeps 3, head 1 keeps 4
        layer.keep(keep, lengths=torch.tensor([[3, 4]]))
    cache.seen = 6
    restored = payload_to_cache(decode_cache(encode_cache(cache_to_payload(cache))), spec)
    assert restored.seen == 6 and restored.stats() == cache.stats()
    for a, b in zip(cache.layers, restored.layers):
        assert torch.equal(a.lengths, b.lengths) and a.uniform == b.uniform
        mask = a.valid_mask()
        for x, y in zip(a.view(), b.view()):
            assert torch.equal(x[mask], y[mask])


@pytest.mark.parametrize("damage", ["flip_body", "flip_header", "truncate", "extend", "magic", "empty"])
def test_corruption_is_detected(damage):
    blob = bytearray(encode_chunk(make_chunk()))
    if damage == "flip_body":
        blob[-3] ^= 0x01
    elif damage == "flip_header":
        blob[40] ^= 0x20
    elif damage == "truncate":
        blob = blob[:-1]
    elif damage == "extend":
        blob += b"\0"
    elif damage == "magic":
        blob[0:4] = b"XXXX"
    else:
        blob = bytearray()
    with pytest.raises(CorruptChunk):
        decode_chunk(bytes(blob))


def test_kind_mismatch_is_corrupt():
    with pytest.raises(CorruptChunk, match="kind"):
        decode_cache(encode_chunk(make_chunk()))


def test_bad_shapes_are_rejected_at_construction():
    k = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="kv_heads"):
        ChunkKV([k], [k[:, :3]], [torch.zeros(2, 4, dtype=torch.int32)])
    with pytest.raises(ValueError, match="lengths"):
        kv = torch.zeros(1, 2, 3, 4)
        LayerEntries(kv, kv, torch.zeros(1, 2, 3), torch.full((1, 2), 4))
