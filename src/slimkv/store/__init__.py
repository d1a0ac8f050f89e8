"""slimkv's tiered KV store: chunk keys, a verified codec, storage tiers and a stack of them.

After LMCache: the KV of fixed-size token chunks (or a whole compressed cache) is stored outside the
accelerator under a key that encodes everything that makes it reusable (tenant namespace, model
fingerprint, dtype, codec, chunk size, chained hash of the token prefix) and reused by later requests
and other processes. A typical use::

    spec = KeySpec(tenant="acme", model=fingerprint, dtype="bfloat16", chunk_size=256)
    keys = chunk_keys(prompt_ids, spec)                    # one key per full chunk
    with parse_store_spec("memory,disk:/var/cache/slimkv") as store:
        reusable = store.match_prefix(keys)                # leading chunks already stored
        store.put_chunk(keys[i], ChunkKV(keys=..., values=..., positions=...))
        chunk = store.get_chunk(keys[0])                   # None on a miss (or a corrupt entry)

Modules: ``keys`` (keys and hashing), ``frame`` (checksummed envelope), ``codec`` (tensors <-> bytes),
``convert`` (SlimCache <-> payload), ``tiers`` (memory, disk, redis), ``stack`` (TierStack),
``spec`` (the ``--store`` command-line syntax).
"""

from .codec import CachePayload, ChunkKV, LayerEntries, decode_cache, decode_chunk, encode_cache, encode_chunk
from .convert import cache_to_payload, payload_to_cache
from .errors import CorruptChunk, StoreError
from .keys import ChunkKey, KeySpec, chunk_keys, prompt_key
from .spec import TierConfig, parse_size, parse_store_spec, parse_tier_configs
from .stack import StackStats, TierStack
from .tiers import DiskTier, MemoryTier, RedisTier, Tier, TierStats

__all__ = [
    "CachePayload", "ChunkKV", "ChunkKey", "CorruptChunk", "DiskTier", "KeySpec", "LayerEntries",
    "MemoryTier", "RedisTier", "StackStats", "StoreError", "Tier", "TierConfig", "TierStack", "TierStats",
    "cache_to_payload",
    "chunk_keys", "decode_cache", "decode_chunk", "encode_cache", "encode_chunk", "parse_size",
    "parse_store_spec", "parse_tier_configs", "payload_to_cache", "prompt_key",
]
