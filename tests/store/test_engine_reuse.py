"""The engine with a store: identical output with and without reuse, faults degrade to recomputation."""

from __future__ import annotations

import pytest

from slimkv.compressors import make_compressor
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.store import parse_store_spec

from ..conftest import ToyTokenizer, prompt_ids

CONFIG = GenerationConfig(max_new_tokens=10, ignore_eos=True)


def make_engine(llama, spec, tenant="alice", compressor=None, chunk=16):
    engine = Engine(llama, ToyTokenizer(), compressor)
    stack = parse_store_spec(spec)
    engine.use_store(stack, tenant=tenant, chunk_size=chunk)
    return engine, stack


@pytest.mark.parametrize("question", [True, False])
def test_reuse_gives_identical_output(llama, tmp_path, question):
    segments = Segments(prompt_ids(70, seed=1), prompt_ids(6, seed=2) if question else [])
    reference = Engine(llama, ToyTokenizer()).generate(segments, CONFIG)
    engine, stack = make_engine(llama, f"memory,disk:{tmp_path}")
    first = engine.generate(segments, CONFIG)
    stack.flush()
    # a second engine and stack on the same folder: what another process would see
    other, other_stack = make_engine(llama, f"disk:{tmp_path}")
    second = other.generate(segments, CONFIG)
    assert first.token_ids == second.token_ids == reference.token_ids
    assert first.store.hit_tokens == 0
    expected_hits = 70 if question else 64  # a context a question follows loads whole
    assert second.store.hit_tokens == expected_hits
    stack.close()
    other_stack.close()


def test_corrupt_chunk_on_disk_is_recomputed(llama, tmp_path):
    segments = Segments(prompt_ids(70, seed=3), prompt_ids(5, seed=4))
    engine, stack = make_engine(llama, f"disk:{tmp_path}")
    first = engine.generate(segments, CONFIG)
    stack.flush()
    files = sorted(tmp_path.rglob("*.skv"))
    assert files
    victim = files[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = engine.generate(segments, CONFIG)
    assert again.token_ids == first.token_ids
    assert again.store.hit_tokens < 70  # the chain stops at the corrupt chunk
    stack.close()


def test_tenants_do_not_share(llama, tmp_path):
    segments = Segments(prompt_ids(40, seed=5), prompt_ids(4, seed=6))
    alice, a = make_engine(llama, f"disk:{tmp_path}", tenant="alice")
    alice.generate(segments, CONFIG)
    a.flush()
    bob, b = make_engine(llama, f"disk:{tmp_path}", tenant="bob")
    assert b.list("bob") == [] and len(b.list("alice")) > 0
    assert bob.generate(segments, CONFIG).store.hit_tokens == 0  # alice's entries are invisible to bob
    a.close()
    b.close()


def test_compressed_context_is_reused(llama, tmp_path):
    segments = Segments(prompt_ids(80, seed=7), prompt_ids(5, seed=8))
    comp = make_compressor("snapkv", ratio=0.5)
    reference = Engine(llama, ToyTokenizer(), comp).generate(segments, CONFIG)
    engine, stack = make_engine(llama, "memory", compressor=comp)
    engine.generate(segments, CONFIG)
    again = engine.generate(segments, CONFIG)
    assert again.token_ids == reference.token_ids
    assert again.store.hit_tokens == 80 and again.store.miss_tokens == 5
    assert again.cache_after_prefill.tokens_kept == 40 + 5
    stack.close()


def test_redis_reuse_and_server_loss(llama, redis_server):
    segments = Segments(prompt_ids(60, seed=9), prompt_ids(5, seed=10))
    reference = Engine(llama, ToyTokenizer()).generate(segments, CONFIG)
    engine, stack = make_engine(llama, f"memory?capacity=1,{redis_server.url}")  # memory too small: Redis serves
    engine.generate(segments, CONFIG)
    stack.flush()
    hit = engine.generate(segments, CONFIG)
    assert hit.store.hit_tokens == 60 and hit.token_ids == reference.token_ids
    # corrupt every stored chunk of the tenant inside Redis: detected, recomputed, same output
    import redis

    raw = redis.Redis.from_url(redis_server.url)
    names = raw.keys("slimkv:alice:*")
    assert names
    for name in names:
        raw.setrange(name, raw.strlen(name) - 2, b"\xff")
    raw.close()
    stack.tiers[0].clear()  # the (tiny) memory tier must not serve a good copy
    healed = engine.generate(segments, CONFIG)
    assert healed.token_ids == reference.token_ids and healed.store.hit_tokens == 0
    redis_server.stop()
    down = engine.generate(segments, CONFIG)  # degrades to recomputation, same output
    assert down.token_ids == reference.token_ids and down.store.hit_tokens == 0
    stack.close()
