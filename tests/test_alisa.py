"""ALISA: a recent window plus the entries the *latest* queries attended to, chosen again every step."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import KVLayer, LayerStates
from slimkv.compressors import ScoreContext, make_compressor
from slimkv.compressors.state import QueryWindow
from slimkv.engine import Engine, GenerationConfig, Segments
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


def ctx(states: LayerStates, keep: int = 4, seen: int = 10, phase: str = "decode") -> ScoreContext:
    return ScoreContext(0, 1, torch.tensor([keep]), torch.tensor([seen]), phase, states)


def window(cache, comp, layer: int = 0) -> QueryWindow | None:
    return cache.states[layer].get(comp.state_key, QueryWindow)


def test_the_latest_queries_decide_not_the_accumulated_history():
    comp = make_compressor("alisa", budget=4, queries=2, recent=0.25)
    layer, states = toy_layer(), LayerStates()
    axis = torch.eye(4)
    pos = torch.tensor([[9]])
    for _ in range(5):  # an old phase: queries look at entry 5
        comp.observe(layer, ctx(states), axis[1].view(1, 1, 1, 4), pos, None)
    for _ in range(2):  # the latest two queries look at entry 3
        comp.observe(layer, ctx(states), axis[0].view(1, 1, 1, 4), pos, None)
    assert states.get(comp.state_key, QueryWindow).queries.shape == (1, 1, 2, 4)  # only the latest `queries`
    scores = comp.score(layer, ctx(states))[0, 0]
    assert scores[9] == float("inf")  # the recent window (a quarter of 4 = position 9)
    assert scores[3] > 1.9 and scores[5] < 0.01  # H2O's sum would rank entry 5 first
    room = comp.make_room(layer, ctx(states), cap=4)
    assert bool(room.full.all()) and int(room.slots) not in (3, 9)


def test_decode_keeps_recent_window_and_budget(llama):
    comp = make_compressor("alisa", budget=16, phase="decode", recent=0.5, queries=4)
    engine = Engine(llama, ToyTokenizer(), comp)
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    result = engine.generate(Segments(prompt_ids(10), []), config)
    assert result.cache.tokens_kept == 16
    # replay the generated tokens step by step to look at the kept positions after every step
    runner = engine.runner
    cache, _ = engine.prepare(Segments(prompt_ids(10), []))
    for step, token in enumerate(result.token_ids[:-1]):
        runner.forward([runner.row(cache, [token], comp, "decode")])
        for i, layer in enumerate(cache.layers):
            kept = set(layer.view()[2][0, 0].tolist())
            assert set(range(cache.seen - 8, cache.seen)) <= kept  # half of 16: the recent window
            assert len(kept) <= 16
            # decode phase only: the prompt's queries were not kept
            assert window(cache, comp, i).queries.shape[2] == min(step + 1, 4)
    assert cache.seen == 10 + 29


def test_prefill_keeps_what_the_last_prompt_queries_attend(llama):
    comp = make_compressor("alisa", ratio=0.5, queries=4)
    engine = Engine(llama, ToyTokenizer(), comp)
    cache, _ = engine.prepare(Segments(prompt_ids(40, seed=2), []))
    full, _ = engine.with_compressor(None).prepare(Segments(prompt_ids(40, seed=2), []))
    layer, states = full.layers[0], LayerStates()
    comp.observe(layer, ctx(states), *_last_queries(engine, prompt_ids(40, seed=2)))
    assert cache.layers[0].lengths.tolist() == [[20, 20]]
    expect = comp.score(layer, ctx(states, keep=20, seen=40, phase="prefill"))
    kept = cache.layers[0].view()[2][0].sort().values
    top = expect[0].topk(20).indices.sort().values.to(kept.dtype)
    assert torch.equal(kept, top)


def test_both_phases_keep_the_latest_prompt_queries_for_decoding(llama):
    comp = make_compressor("alisa", budget=16, phase="both", queries=4)
    engine = Engine(llama, ToyTokenizer(), comp)
    cache, last = engine.prepare(Segments(prompt_ids(40, seed=3), []))
    for i in range(len(cache.layers)):  # compressed to the budget, the prompt's last 4 queries still there
        assert window(cache, comp, i).positions.tolist() == [[36, 37, 38, 39]]
    before = [layer.view()[2][0].clone() for layer in cache.layers]
    engine.runner.forward([engine.runner.row(cache, [int(last.argmax())], comp, "decode")])
    for layer, old in zip(cache.layers, before):
        for head in range(old.shape[0]):  # the evicted entry is the least attended, not the oldest
            gone = set(old[head].tolist()) - set(layer.view()[2][0, head].tolist())
            assert len(gone) == 1
    assert any(0 in set(layer.view()[2][0, h].tolist()) for layer in cache.layers for h in range(2))
    prefill_only = Engine(llama, ToyTokenizer(), make_compressor("alisa", budget=16, queries=4))
    cache, _ = prefill_only.prepare(Segments(prompt_ids(40, seed=3), []))
    assert all(len(states) == 0 for states in cache.states)  # no state kept that nothing reads


def _last_queries(engine, ids):
    """The post-RoPE queries of layer 0 for the last 4 prompt tokens, recorded by a probe observer."""
    probe = make_compressor("alisa", ratio=0.5, queries=4)
    cache = engine.new_cache()
    engine.prefill(cache, ids, observers=(probe,))
    recorded = window(cache, probe)
    return recorded.queries, recorded.positions, None


@pytest.mark.parametrize("bad", [dict(queries=0), dict(recent=1.5)])
def test_bad_settings_fail_at_configuration(bad):
    with pytest.raises(ConfigError, match="alisa"):
        make_compressor("alisa", ratio=0.5, **bad)
