"""LaCache's ladder: staggered kept tokens across layers, oldest history thinned first, fixed budget."""

from __future__ import annotations

import torch

from slimkv.compressors import make_compressor
from slimkv.engine import Engine, GenerationConfig, Segments

from .conftest import ToyTokenizer, prompt_ids


def kept_positions(cache, layer):
    return sorted(cache.layers[layer].view()[2][0, 0].tolist())


def test_ladder_staggers_layers_and_keeps_sinks_and_recent(llama):
    comp = make_compressor("lacache", ratio=0.5, sinks=2, recent=0.25, span=1)  # stride = layers
    engine = Engine(llama, ToyTokenizer(), comp)
    with engine.adapter.attached():
        cache, _ = engine.prepare(Segments(prompt_ids(80), []))
    keep = 40
    layers = [kept_positions(cache, i) for i in range(len(cache.layers))]
    for kept in layers:
        assert len(kept) == keep
        assert {0, 1} <= set(kept) and set(range(70, 80)) <= set(kept)  # sinks, recent window (10)
    assert set(layers[0]).isdisjoint(set(layers[1]) - {0, 1} - set(range(70, 80)))  # rungs differ by layer
    # the newer history is covered at stride 2 (each layer one rung, together every position) ...
    assert set(layers[0]) | set(layers[1]) >= set(range(40, 80))
    # ... the oldest was compacted again, to stride 4
    assert [p for p in layers[0] if 2 <= p < 26] == list(range(2, 26, 4))


def test_decode_stays_within_budget_and_thins_old_history_first(llama):
    comp = make_compressor("lacache", budget=24, phase="decode", sinks=2)
    engine = Engine(llama, ToyTokenizer(), comp)
    result = engine.generate(Segments(prompt_ids(30), []), GenerationConfig(max_new_tokens=60, ignore_eos=True))
    assert len(result.token_ids) == 60
    assert result.cache.tokens_kept == 24
    spec = engine.adapter.spec
    per_row = 24 * (2 * spec.head_dim * 4 + 4) + 8  # fp32 keys + values + int32 positions, int64 length
    assert result.cache.bytes_kept == spec.layers * spec.kv_heads * per_row  # the budget, not a slot more


def test_score_prefers_aligned_then_recent():
    from slimkv.cache import KVLayer
    from slimkv.compressors import ScoreContext

    comp = make_compressor("lacache", ratio=0.5, sinks=0, recent=0.0, span=1)
    layer = KVLayer()
    n = 16
    layer.append(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4), torch.arange(n)[None], exact=True)
    ctx = ScoreContext(layer_idx=0, num_layers=2, keep=torch.tensor([8]), seen=torch.tensor([n]), phase="prefill")
    score = comp.score(layer, ctx)[0, 0]
    top = sorted(score.topk(8).indices.tolist())
    assert top == [0, 2, 4, 6, 8, 10, 12, 14]  # stride 2 on layer 0: the even rung
