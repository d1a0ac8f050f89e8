"""Memory tier: LRU within a byte capacity, thread safety."""

from __future__ import annotations

import threading

from slimkv.store import MemoryTier

from .helpers import make_key


def test_lru_keeps_the_byte_capacity():
    tier = MemoryTier(capacity_bytes=350)
    for n in range(3):
        assert tier.put(make_key(n), bytes([n]) * 100)
    assert tier.get(make_key(0)) == bytes([0]) * 100  # 0 is now the most recently used
    assert tier.put(make_key(3), b"\3" * 100)  # 400 > 350: evicts the least recently used, 1
    assert tier.used_bytes() == 300 <= tier.capacity_bytes
    assert not tier.contains(make_key(1))
    assert all(tier.contains(make_key(n)) for n in (0, 2, 3))
    stats = tier.stats("acme")
    assert (stats.entries, stats.bytes, stats.hits, stats.puts, stats.evictions) == (3, 300, 1, 4, 1)


def test_replacing_and_deleting_keep_the_count_right():
    tier = MemoryTier(capacity_bytes=1000)
    tier.put(make_key(0), b"a" * 100)
    tier.put(make_key(0), b"b" * 50)
    assert tier.used_bytes() == 50 and tier.get(make_key(0)) == b"b" * 50
    assert tier.delete(make_key(0)) and not tier.delete(make_key(0))
    assert tier.used_bytes() == 0 and tier.get(make_key(0)) is None
    assert tier.stats("acme").misses == 1


def test_an_entry_larger_than_the_tier_is_refused():
    tier = MemoryTier(capacity_bytes=10)
    assert not tier.put(make_key(0), b"x" * 11)
    assert tier.used_bytes() == 0


def test_concurrent_threads_keep_the_accounting_consistent():
    tier = MemoryTier(capacity_bytes=50 * 64)

    def work(t: int) -> None:
        for i in range(200):
            key = make_key(t * 1000 + i % 80)
            tier.put(key, bytes([t]) * 64)
            tier.get(make_key(t * 1000 + (i * 7) % 80))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stats = tier.stats("acme")
    assert tier.used_bytes() == stats.bytes == 64 * stats.entries <= tier.capacity_bytes
    assert stats.puts == 800 and stats.hits + stats.misses == 800
