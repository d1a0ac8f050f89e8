"""TierStack: read-through with promotion, write-behind, corruption handling, decoded payloads."""

from __future__ import annotations

import logging
import threading

import torch

from slimkv.store import (
    CachePayload,
    DiskTier,
    LayerEntries,
    MemoryTier,
    RedisTier,
    TierStack,
    chunk_keys,
    encode_chunk,
)

from .conftest import needs_redis
from .helpers import SPEC, chunks_equal, make_chunk, make_key


class SlowTier(MemoryTier):
    """A memory tier whose puts wait until ``gate`` is set (to fill the write-behind queue)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def put(self, key, blob):
        self.gate.wait(timeout=30)
        return super().put(key, blob)


def test_write_behind_reaches_the_lower_tiers_after_flush(tmp_path):
    top, disk = MemoryTier(), DiskTier(tmp_path)
    with TierStack([top, disk]) as stack:
        assert stack.put_chunk(make_key(0), make_chunk(5))
        assert top.contains(make_key(0))  # synchronous
        assert stack.flush(timeout=10)
        assert disk.contains(make_key(0)) and stack.stats("acme").pending_writes == 0
    assert chunks_equal(TierStack([DiskTier(tmp_path)]).get_chunk(make_key(0)), make_chunk(5))


def test_a_hit_below_is_promoted_to_every_tier_above(tmp_path):
    top, middle, bottom = MemoryTier(), DiskTier(tmp_path / "a"), DiskTier(tmp_path / "b")
    blob = encode_chunk(make_chunk())
    bottom.put(make_key(0), blob)
    with TierStack([top, middle, bottom]) as stack:
        assert stack.get(make_key(0)) == blob
        assert top.contains(make_key(0))  # at once
        stack.flush()
        assert middle.contains(make_key(0))
        assert [s.hits for s in stack.stats("acme").tiers] == [0, 0, 1]
        assert stack.get(make_key(0)) == blob
        assert [s.hits for s in stack.stats("acme").tiers] == [1, 0, 1]


def test_a_full_queue_drops_lower_writes_without_blocking():
    slow = SlowTier()
    stack = TierStack([MemoryTier(), slow], queue_size=2)
    for n in range(5):  # one in flight, two queued, the rest dropped; put returns at once
        assert stack.put(make_key(n), b"x")
    assert stack.stats("acme").dropped_writes >= 2
    slow.gate.set()
    assert stack.flush(timeout=10)
    stack.close()
    stack.close()  # idempotent


def test_flush_times_out_while_a_tier_is_stuck():
    slow = SlowTier()
    stack = TierStack([MemoryTier(), slow])
    stack.put(make_key(0), b"x")
    assert not stack.flush(timeout=0.05)
    slow.gate.set()
    assert stack.flush(timeout=10)
    stack.close()


def test_a_corrupt_entry_is_a_miss_a_warning_and_gone_from_every_tier(tmp_path, caplog):
    top, disk = MemoryTier(), DiskTier(tmp_path)
    with TierStack([top, disk]) as stack:
        blob = bytearray(encode_chunk(make_chunk()))
        blob[-1] ^= 0x01
        stack.put(make_key(0), bytes(blob))  # the memory tier does not verify; the decode does
        stack.flush()
        with caplog.at_level(logging.WARNING):
            assert stack.get_chunk(make_key(0)) is None
        assert "corrupt" in caplog.text
        assert not stack.contains(make_key(0))


def test_match_prefix_counts_leading_chunks(tmp_path):
    keys = chunk_keys(list(range(16)), SPEC)
    with TierStack([MemoryTier(), DiskTier(tmp_path)]) as stack:
        assert stack.match_prefix(keys) == 0
        for key in keys[:2]:
            stack.put_chunk(key, make_chunk())
        stack.put_chunk(keys[3], make_chunk())  # after a gap: not part of the reusable prefix
        assert stack.match_prefix(keys) == 2


def test_cache_payload_round_trip_through_the_stack(tmp_path):
    lengths = torch.tensor([[2, 3]])
    layer = LayerEntries(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                         torch.arange(3, dtype=torch.int32).expand(1, 2, 3).contiguous(), lengths)
    with TierStack([MemoryTier(), DiskTier(tmp_path)]) as stack:
        stack.put_cache(make_key(9), CachePayload([layer], seen=[3]))
        stack.flush()
    out = TierStack([DiskTier(tmp_path)]).get_cache(make_key(9))
    mask = layer.valid_mask()
    assert out is not None and out.seen == [3] and torch.equal(out.layers[0].keys[mask], layer.keys[mask])


@needs_redis
def test_memory_disk_redis_stack_shares_through_redis(tmp_path, redis_server):
    with TierStack([MemoryTier(), DiskTier(tmp_path / "a"), RedisTier(redis_server.url)]) as stack:
        stack.put_chunk(make_key(0), make_chunk(7))
    # another replica: its own memory and disk, the same Redis
    with TierStack([MemoryTier(), DiskTier(tmp_path / "b"), RedisTier(redis_server.url)]) as other:
        assert chunks_equal(other.get_chunk(make_key(0)), make_chunk(7))
        other.flush()
        assert other.tiers[1].contains(make_key(0))  # promoted into the replica's disk
