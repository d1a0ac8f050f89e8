"""Builders shared by the store tests, and the functions child processes run (importable by spawn)."""

from __future__ import annotations

import torch

from slimkv.store import (
    ChunkKey,
    ChunkKV,
    DiskTier,
    KeySpec,
    RedisTier,
    chunk_keys,
    decode_chunk,
    encode_chunk,
)

SPEC = KeySpec(tenant="acme", model="model-sha", dtype="float32", chunk_size=4)


def make_chunk(seed: int = 0, layers: int = 2, heads: int = 2, tokens: int = 4, dim: int = 8,
               dtype: torch.dtype = torch.float32) -> ChunkKV:
    """Random KV of one chunk: per layer keys/values [heads, tokens, dim], positions [heads, tokens]."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, tokens, dim, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(heads, tokens, dim, generator=g).to(dtype) for _ in range(layers)]
    row = torch.arange(tokens, dtype=torch.int32).expand(heads, tokens)
    positions = [row.contiguous() for _ in range(layers)]
    return ChunkKV(keys, values, positions)


def make_key(n: int = 0, tenant: str = "acme", shared: str | None = None) -> ChunkKey:
    """The key of the first chunk of a prompt that depends on ``n`` (distinct n, distinct keys)."""
    spec = KeySpec(tenant=tenant, model="model-sha", dtype="float32", chunk_size=4, shared_namespace=shared)
    return chunk_keys([n, n + 1, n + 2, n + 3], spec)[0]


def chunks_equal(a: ChunkKV, b: ChunkKV) -> bool:
    pairs = zip(a.keys + a.values + a.positions, b.keys + b.values + b.positions)
    return len(a.keys) == len(b.keys) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in pairs)


# ---------------------------------------------------------------------- child processes
def disk_put(root: str, n: int, seed: int) -> int:
    """Write chunk ``seed`` under key ``n`` into a disk tier at ``root``; return its size."""
    blob = encode_chunk(make_chunk(seed))
    DiskTier(root).put(make_key(n), blob)
    return len(blob)


def disk_get_equal(root: str, n: int, seed: int) -> bool:
    """Whether a fresh disk tier at ``root`` returns chunk ``seed`` for key ``n``."""
    blob = DiskTier(root).get(make_key(n))
    return blob is not None and chunks_equal(decode_chunk(blob), make_chunk(seed))


def big_blob(seed: int) -> bytes:
    """A ~0.5 MB encoded chunk: large enough that a non-atomic write would be seen half done."""
    return encode_chunk(make_chunk(seed, tokens=256, dim=64))


def disk_hammer(root: str, n: int, seeds: tuple[int, int], mine: int, rounds: int) -> tuple[int, int]:
    """Delete, write (blob ``seeds[mine]``) and read one entry ``rounds`` times while another process
    does the same with the other blob. Returns (reads that were a whole blob of either writer or a
    clean miss, corrupt entries seen)."""
    tier, key = DiskTier(root), make_key(n)
    blobs = {big_blob(s) for s in seeds}
    own = big_blob(seeds[mine])
    good = 0
    for _ in range(rounds):
        tier.delete(key)
        tier.put(key, own)
        got = tier.get(key)
        good += got is None or got in blobs
    return good, tier.stats(key.namespace).corrupt


def redis_put(url: str, n: int, seed: int) -> bool:
    tier = RedisTier(url, timeout=2.0)
    ok = tier.put(make_key(n), encode_chunk(make_chunk(seed)))
    tier.close()
    return ok


def redis_get_equal(url: str, n: int, seed: int) -> bool:
    tier = RedisTier(url, timeout=2.0)
    blob = tier.get(make_key(n))
    tier.close()
    return blob is not None and chunks_equal(decode_chunk(blob), make_chunk(seed))
