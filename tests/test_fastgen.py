"""FastGen while generating (phase="both"): every head keeps following the policy chosen on its prompt."""

from __future__ import annotations

import math

import pytest
import torch

from slimkv import compressors
from slimkv.compressors.eviction.fastgen import FastGenState
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.engine.prompts import punctuation_table
from slimkv.errors import ConfigError
from slimkv.evals.fidelity import perplexity

from .conftest import ToyTokenizer, prompt_ids

SINKS = 4


def fastgen_engine(llama, **kw) -> Engine:
    kw = {"ratio": 0.01, "phase": "both", **kw}
    return Engine(llama, ToyTokenizer(), compressors.make_compressor("fastgen", **kw))


def feed(engine: Engine, cache, tokens: list[int]) -> list[list[int]]:
    """Decode ``tokens`` one by one (teacher-forced); returns each step's largest row length per layer."""
    lengths = []
    for token in tokens:
        engine.runner.forward([engine.runner.row(cache, [token], engine.compressor, "decode")])
        lengths.append([int(layer.lengths.max()) for layer in cache.layers])
    return lengths


def kept_positions(layer, head: int) -> set[int]:
    _, _, positions = layer.view()
    return set(positions[0, head, : int(layer.lengths[0, head])].tolist())


def policies(engine: Engine, cache) -> list[FastGenState]:
    return [states.get(engine.compressor.state_key, FastGenState) for states in cache.states]


def prepared(engine: Engine, n: int = 60, policy: int | None = None):
    cache, _ = engine.prepare(Segments(prompt_ids(n, seed=7), []))
    if policy is not None:  # give every head this policy, as if the prompt had chosen it
        for state in policies(engine, cache):
            state.policy = torch.full_like(state.policy, policy)
    return cache


def test_special_heads_keep_only_their_sinks_while_generating(llama):
    engine = fastgen_engine(llama, recovery=0.01)  # the sinks recover 1% of any head's attention
    cache = prepared(engine)
    assert all(bool((state.policy == 0).all()) for state in policies(engine, cache))
    steps = feed(engine, cache, prompt_ids(30, seed=8))
    assert max(max(s) for s in steps) <= SINKS + 1  # the sinks, and the newest token (attended once)
    for layer in cache.layers:
        for head in range(layer.lengths.shape[1]):
            assert kept_positions(layer, head) <= set(range(SINKS)) | {89}
    # the same prompt with prefill-only FastGen: every generated token stays
    plain = fastgen_engine(llama, recovery=0.01, phase="prefill")
    result = plain.generate(Segments(prompt_ids(60, seed=7), []), GenerationConfig(max_new_tokens=30, ignore_eos=True))
    both = engine.generate(Segments(prompt_ids(60, seed=7), []), GenerationConfig(max_new_tokens=30, ignore_eos=True))
    assert both.cache.bytes_kept < result.cache.bytes_kept
    assert result.cache.tokens_kept >= SINKS + 29 and both.cache.tokens_kept <= SINKS + 1


def test_punctuation_heads_keep_generated_punctuation(llama):
    engine = fastgen_engine(llama, recovery=0.01)
    cache = prepared(engine, policy=1)
    table = punctuation_table(ToyTokenizer(), 128)
    punct = [i for i in range(2, 128) if table[i]][:3]
    words = [i for i in range(2, 128) if not table[i]][:9]
    fed = [words[0], punct[0], words[1], words[2], punct[1], words[3], punct[2], words[4], words[5]]
    feed(engine, cache, fed)
    first = 60
    expected = {first + i for i, t in enumerate(fed) if t in punct}
    for layer in cache.layers:
        for head in range(layer.lengths.shape[1]):
            kept = kept_positions(layer, head) - set(range(SINKS))
            # special heads chose no prompt entry beyond the sinks; punctuation and the newest stay
            assert kept - {first + len(fed) - 1} == expected


def test_frequent_and_local_heads_hold_their_shares(llama):
    engine = fastgen_engine(llama, recovery=0.01, frequent=0.1, local=0.2)
    cache = prepared(engine, policy=3)  # the prompt kept only the sinks (special); now special+frequent+local
    table = punctuation_table(ToyTokenizer(), 128)
    words = [i for i in range(2, 128) if not table[i]]
    feed(engine, cache, [words[i % len(words)] for i in range(40)])
    seen = cache.seen
    recent = set(range(seen - math.ceil(seen * 0.2), seen))
    for layer in cache.layers:
        for head in range(layer.lengths.shape[1]):
            kept = kept_positions(layer, head)
            assert recent <= kept  # the local share is always held
            # sinks + the most attended tenth + the recent fifth (+ the newest token), nothing else
            assert len(kept) <= SINKS + math.ceil(seen * 0.1) + len(recent) + 1
            assert len(kept) > SINKS + len(recent)  # some heavy hitters beyond the recent window


def test_the_layer_cap_holds_with_every_head_full(llama):
    engine = fastgen_engine(llama, recovery=1.0, ratio=None, budget=24)
    cache = prepared(engine, n=40)
    heads = cache.layers[0].lengths.shape[1]
    feed(engine, cache, prompt_ids(30, seed=10))
    for layer, state in zip(cache.layers, policies(engine, cache)):
        assert bool((state.policy == 4).all())
        assert int(layer.lengths.sum()) <= 24 * heads
        seen = cache.seen
        recent = set(range(seen - math.ceil(seen * 0.1), seen))  # the local share (default 0.1)
        for head in range(heads):
            assert set(range(SINKS)) | recent <= kept_positions(layer, head)  # never evicted at the cap


def test_phase_decode_alone_is_refused():
    with pytest.raises(ConfigError, match="phase='both'"):
        compressors.make_compressor("fastgen", ratio=0.5, phase="decode")


def test_streaming_perplexity_profiles_the_prefix(llama):
    engine = Engine(llama, ToyTokenizer())
    tokens = prompt_ids(120, seed=11)
    comp = compressors.make_compressor("fastgen", budget=16, phase="both", recovery=1.0)
    row = perplexity(engine, tokens, comp, "fastgen", prefix=40)
    assert row.tokens == 80 and row.max_entries <= 16 * 2 and math.isfinite(row.perplexity)
    with pytest.raises(RuntimeError, match="compress the prompt first"):
        fresh = compressors.make_compressor("fastgen", budget=16, phase="both")
        layer_engine = Engine(llama, ToyTokenizer(), fresh)
        cache = layer_engine.new_cache()
        layer_engine.prefill(cache, tokens[:30])
        feed(layer_engine, cache, tokens[30:32])
