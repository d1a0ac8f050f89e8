"""Redis tier against a real redis-server: sharing, corruption, capacity and a dying server."""

from __future__ import annotations

import logging
import time

import pytest

from slimkv.store import RedisTier, decode_chunk, encode_chunk, frame

from . import helpers
from .conftest import needs_redis
from .helpers import chunks_equal, make_chunk, make_key

pytestmark = needs_redis


def test_put_get_delete_list_and_stats(redis_server):
    tier = RedisTier(redis_server.url)
    blob = encode_chunk(make_chunk())
    assert tier.healthy and tier.get(make_key(0)) is None
    assert tier.put(make_key(0), blob) and tier.contains(make_key(0))
    assert tier.get(make_key(0)) == blob
    assert tier.list("acme") == [make_key(0).digest]
    stats = tier.stats("acme")
    assert (stats.entries, stats.bytes, stats.hits, stats.misses, stats.puts) == (1, len(blob), 1, 1, 1)
    assert tier.used_bytes() == len(blob)
    assert tier.delete(make_key(0)) and not tier.contains(make_key(0)) and tier.used_bytes() == 0


def test_a_hit_across_processes(redis_server, spawn_pool):
    assert spawn_pool.apply(helpers.redis_put, (redis_server.url, 1, 11))
    blob = RedisTier(redis_server.url).get(make_key(1))
    assert blob is not None and chunks_equal(decode_chunk(blob), make_chunk(11))
    RedisTier(redis_server.url).put(make_key(2), encode_chunk(make_chunk(12)))
    assert spawn_pool.apply(helpers.redis_get_equal, (redis_server.url, 2, 12))


def test_a_corrupt_value_is_a_miss_and_is_deleted(redis_server, caplog):
    import redis

    tier = RedisTier(redis_server.url)
    tier.put(make_key(0), encode_chunk(make_chunk()))
    raw = redis.Redis.from_url(redis_server.url)
    name = f"slimkv:acme:{make_key(0).digest}"
    raw.setrange(name, raw.strlen(name) - 2, b"\xff")  # flip bytes near the end of the body
    with caplog.at_level(logging.WARNING):
        assert tier.get(make_key(0)) is None
    assert "corrupt" in caplog.text and not raw.exists(name)
    assert tier.stats("acme").corrupt == 1 and tier.used_bytes() == 0
    raw.close()


def test_capacity_evicts_least_recently_used(redis_server):
    blobs = [frame.pack({"n": n}, [bytes([n]) * 300]) for n in range(4)]
    size = len(blobs[0])
    tier = RedisTier(redis_server.url, capacity_bytes=int(3.5 * size), evict_to=0.6)
    for n in range(3):
        tier.put(make_key(n), blobs[n])
        time.sleep(0.002)  # distinct recency scores
    assert tier.get(make_key(0)) == blobs[0]
    tier.put(make_key(3), blobs[3])
    assert sorted(tier.list("acme")) == sorted([make_key(0).digest, make_key(3).digest])
    assert tier.used_bytes() == 2 * size and tier.stats("acme").evictions == 2


def test_a_killed_server_degrades_to_misses_then_recovers(redis_server, caplog):
    tier = RedisTier(redis_server.url, timeout=0.2, retry_after=0.2)
    blob = encode_chunk(make_chunk())
    assert tier.put(make_key(0), blob)
    redis_server.stop()
    with caplog.at_level(logging.WARNING):
        assert tier.get(make_key(0)) is None  # no exception out of any operation
        assert not tier.put(make_key(1), blob)
        assert not tier.contains(make_key(0)) and not tier.delete(make_key(0))
        assert tier.list("acme") == [] and tier.stats("acme").entries == 0 and tier.used_bytes() == 0
    assert not tier.healthy and "unreachable" in caplog.text
    assert caplog.text.count("unreachable") == 1  # one warning per outage, not per call
    started = time.monotonic()
    assert tier.get(make_key(0)) is None and time.monotonic() - started < 0.1  # no network while backing off
    redis_server.start()  # same port, empty (no persistence)
    time.sleep(0.25)
    assert tier.put(make_key(1), blob) and tier.healthy
    assert tier.get(make_key(1)) == blob


def test_an_unreachable_server_at_start_is_not_an_error(redis_server):
    redis_server.stop()
    tier = RedisTier(redis_server.url, timeout=0.1)
    assert not tier.healthy
    assert tier.get(make_key(0)) is None and not tier.put(make_key(0), b"x")
    tier.close()


def test_an_oversized_entry_is_refused(redis_server):
    tier = RedisTier(redis_server.url, capacity_bytes=100)
    assert not tier.put(make_key(0), b"x" * 101) and tier.healthy


@pytest.mark.parametrize("prefix", ["", "a:b"])
def test_bad_prefixes_are_rejected(prefix):
    with pytest.raises(ValueError, match="prefix"):
        RedisTier("redis://127.0.0.1:1/0", prefix=prefix)
