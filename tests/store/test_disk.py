"""Disk tier: restarts, corruption, eviction by recency, and several processes on one folder."""

from __future__ import annotations

import logging
import os

from slimkv.store import DiskTier, decode_chunk, encode_chunk, frame

from . import helpers
from .helpers import chunks_equal, make_chunk, make_key


def test_entries_survive_a_new_instance(tmp_path):
    blob = encode_chunk(make_chunk(3))
    DiskTier(tmp_path).put(make_key(0), blob)
    again = DiskTier(tmp_path)
    assert again.used_bytes() == len(blob)
    assert again.get(make_key(0)) == blob
    assert again.list("acme") == [make_key(0).digest]


def test_a_corrupt_file_is_a_miss_and_is_deleted(tmp_path, caplog):
    tier = DiskTier(tmp_path)
    tier.put(make_key(0), encode_chunk(make_chunk()))
    (path,) = tmp_path.rglob("*.skv")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert tier.get(make_key(0)) is None
    assert "corrupt" in caplog.text and not path.exists()
    stats = tier.stats("acme")
    assert (stats.corrupt, stats.misses, stats.entries) == (1, 1, 0)


def test_eviction_drops_the_least_recently_used_files(tmp_path):
    blobs = [frame.pack({"n": n}, [bytes([n]) * 300]) for n in range(4)]
    size = len(blobs[0])
    tier = DiskTier(tmp_path, capacity_bytes=int(3.5 * size), evict_to=0.6)  # evicts down to 2 entries
    for n in range(3):
        tier.put(make_key(n), blobs[n])
        os.utime(tier._path(make_key(n)), (1_000_000 + n, 1_000_000 + n))  # recency: 0 oldest, then 1, 2
    assert tier.get(make_key(0)) == blobs[0]  # a hit makes 0 the most recently used
    tier.put(make_key(3), blobs[3])  # over capacity: evicts 1 then 2
    assert sorted(tier.list("acme")) == sorted([make_key(0).digest, make_key(3).digest])
    assert tier.used_bytes() == 2 * size and tier.stats("acme").evictions == 2


def test_tmp_files_never_become_visible_and_a_repeat_put_is_a_touch(tmp_path):
    tier = DiskTier(tmp_path)
    blob = encode_chunk(make_chunk())
    assert tier.put(make_key(0), blob) and tier.put(make_key(0), blob)
    assert not list(tmp_path.rglob("*.tmp")) and len(list(tmp_path.rglob("*.skv"))) == 1
    assert tier.used_bytes() == len(blob)


def test_a_hit_across_processes(tmp_path, spawn_pool):
    assert spawn_pool.apply(helpers.disk_put, (str(tmp_path), 5, 42)) > 0
    blob = DiskTier(tmp_path).get(make_key(5))
    assert blob is not None and chunks_equal(decode_chunk(blob), make_chunk(42))
    DiskTier(tmp_path).put(make_key(6), encode_chunk(make_chunk(43)))
    assert spawn_pool.apply(helpers.disk_get_equal, (str(tmp_path), 6, 43))


def test_two_processes_writing_the_same_entry(tmp_path, spawn_pool):
    rounds = 30
    jobs = [spawn_pool.apply_async(helpers.disk_hammer, (str(tmp_path), 7, (1, 2), mine, rounds))
            for mine in (0, 1)]
    results = [job.get(timeout=120) for job in jobs]
    assert results == [(rounds, 0), (rounds, 0)]  # every read whole (or a clean miss), nothing corrupt
    assert not list(tmp_path.rglob("*.tmp"))
    final = DiskTier(tmp_path).get(make_key(7))
    assert final in (helpers.big_blob(1), helpers.big_blob(2))
