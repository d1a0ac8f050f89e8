"""ALISA: a recent window plus the entries the *latest* queries attended to, chosen again every step."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import KVLayer
from slimkv.compressors import ScoreContext, make_compressor
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.engine.forward import ForwardContext
from slimkv.errors import ConfigError

from .conftest import ToyTokenizer, prompt_ids


def toy_layer() -> KVLayer:
    """One row of 10 entries (positions 0-9): entry 3 points along axis 0, entry 5 along axis 1."""
    keys = torch.zeros(1, 1, 10, 4)
    keys[0, 0, 3, 0] = 10.0
    keys[0, 0, 5, 1] = 10.0
    layer = KVLayer()
    layer.append(keys, torch.randn(1, 1, 10, 4), torch.arange(10)[None])
    return layer


def ctx(keep: int = 4, seen: int = 10) -> ScoreContext:
    return ScoreContext(0, 1, torch.tensor([keep]), torch.tensor([seen]), "decode")


def test_the_latest_queries_decide_not_the_accumulated_history():
    comp = make_compressor("alisa", budget=4, queries=2, recent=0.25)
    layer = toy_layer()
    axis = torch.eye(4)
    pos = torch.tensor([[9]])
    for _ in range(5):  # an old phase: queries look at entry 5
        comp.observe(layer, ctx(), axis[1].view(1, 1, 1, 4), pos, None)
    for _ in range(2):  # the latest two queries look at entry 3
        comp.observe(layer, ctx(), axis[0].view(1, 1, 1, 4), pos, None)
    assert layer.extra["alisa_q"].shape == (1, 1, 2, 4)  # only the latest `queries` are kept
    scores = comp.score(layer, ctx())[0, 0]
    assert scores[9] == float("inf")  # the recent window (a quarter of 4 = position 9)
    assert scores[3] > 1.9 and scores[5] < 0.01  # H2O's sum would rank entry 5 first
    slots, full = comp.make_room(layer, ctx())
    assert bool(full.all()) and int(slots) not in (3, 9)


def test_decode_keeps_recent_window_and_budget(llama):
    comp = make_compressor("alisa", budget=16, phase="decode", recent=0.5, queries=4)
    engine = Engine(llama, ToyTokenizer(), comp)
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    result = engine.generate(Segments(prompt_ids(10), []), config)
    assert result.cache.tokens_kept == 16
    # replay the generated tokens step by step to look at the kept positions after every step
    with engine.adapter.attached():
        cache, _ = engine.prepare(Segments(prompt_ids(10), []))
        for step, token in enumerate(result.token_ids[:-1]):
            pos = torch.tensor([[cache.seen[0]]])
            ctx = ForwardContext(cache, pos, comp, phase="decode")
            engine.adapter.forward(torch.tensor([[token]]), pos, ctx)
            cache.seen[0] += 1
            for layer in cache.layers:
                kept = set(layer.view()[2][0, 0].tolist())
                assert set(range(cache.seen[0] - 8, cache.seen[0])) <= kept  # half of 16: the recent window
                assert len(kept) <= 16
                # decode phase only: the prompt's queries were not kept
                assert layer.extra["alisa_q"].shape[2] == min(step + 1, 4)
    assert cache.seen[0] == 10 + 29


def test_prefill_keeps_what_the_last_prompt_queries_attend(llama):
    comp = make_compressor("alisa", ratio=0.5, queries=4)
    engine = Engine(llama, ToyTokenizer(), comp)
    with engine.adapter.attached():
        cache, _ = engine.prepare(Segments(prompt_ids(40, seed=2), []))
        full, _ = engine.with_compressor(None).prepare(Segments(prompt_ids(40, seed=2), []))
    layer = full.layers[0]
    comp.observe(layer, ctx(), *_last_queries(engine, prompt_ids(40, seed=2)))
    assert cache.layers[0].lengths.tolist() == [[20, 20]]
    expect = comp.score(layer, ScoreContext(0, 2, torch.tensor([20]), torch.tensor([40]), "prefill"))
    kept = cache.layers[0].view()[2][0].sort().values
    top = expect[0].topk(20).indices.sort().values.to(kept.dtype)
    assert torch.equal(kept, top)


def test_both_phases_keep_the_latest_prompt_queries_for_decoding(llama):
    comp = make_compressor("alisa", budget=16, phase="both", queries=4)
    engine = Engine(llama, ToyTokenizer(), comp)
    with engine.adapter.attached():
        cache, last = engine.prepare(Segments(prompt_ids(40, seed=3), []))
        for layer in cache.layers:  # compressed to the budget, the prompt's last 4 queries still there
            assert layer.extra["alisa_pos"].tolist() == [[36, 37, 38, 39]]
        before = [layer.view()[2][0].clone() for layer in cache.layers]
        pos = torch.tensor([[cache.seen[0]]])
        engine.adapter.forward(last.argmax(-1, keepdim=True), pos, ForwardContext(cache, pos, comp, phase="decode"))
    for layer, old in zip(cache.layers, before):
        for head in range(old.shape[0]):  # the evicted entry is the least attended, not the oldest
            gone = set(old[head].tolist()) - set(layer.view()[2][0, head].tolist())
            assert len(gone) == 1
    assert any(0 in set(layer.view()[2][0, h].tolist()) for layer in cache.layers for h in range(2))
    prefill_only = Engine(llama, ToyTokenizer(), make_compressor("alisa", budget=16, queries=4))
    with prefill_only.adapter.attached():
        cache, _ = prefill_only.prepare(Segments(prompt_ids(40, seed=3), []))
    assert all("alisa_q" not in layer.extra for layer in cache.layers)  # no state kept that nothing reads


def _last_queries(engine, ids):
    """The post-RoPE queries of layer 0 for the last 4 prompt tokens, recorded by a probe observer."""
    probe = make_compressor("alisa", ratio=0.5, queries=4)
    with engine.adapter.attached():
        cache = engine.new_cache()
        engine.prefill(cache, ids, observers=(probe,))
    return cache.layers[0].extra["alisa_q"], cache.layers[0].extra["alisa_pos"], None


@pytest.mark.parametrize("bad", [dict(queries=0), dict(recent=1.5)])
def test_bad_settings_fail_at_configuration(bad):
    with pytest.raises(ConfigError, match="alisa"):
        make_compressor("alisa", ratio=0.5, **bad)
