"""H2O's prefill mass: exact from the attention pass, or estimated from one query in ``query_stride``."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import KVLayer
from slimkv.cache.attention import AttentionMeta, attend_rows
from slimkv.compressors import make_compressor
from slimkv.compressors.eviction.h2o import sampled_mass
from slimkv.engine import Engine, Segments
from slimkv.errors import ConfigError

from .conftest import ToyTokenizer, prompt_ids


def _pass(tokens: int = 50, heads: int = 2, groups: int = 3, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, tokens, dim, generator=gen)
    layer = KVLayer()
    layer.append(keys, torch.randn(1, heads, tokens, dim, generator=gen), torch.arange(tokens)[None], exact=True)
    layer.scale = dim ** -0.5
    query = 2 * torch.randn(1, heads * groups, tokens, dim, generator=gen)
    return layer, query, torch.arange(tokens)[None]


def test_stride_one_is_the_exact_mass_of_the_attention_pass():
    layer, query, qpos = _pass()
    keys, values, positions = layer.view()
    _, exact = attend_rows(query, keys, values, positions, AttentionMeta(qpos, 50, layer.scale, key_mass=True))
    torch.testing.assert_close(sampled_mass(layer, query, qpos, 1), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [4, 16])
def test_sampled_mass_keeps_the_total_and_finds_the_heavy_hitters(stride):
    layer, query, qpos = _pass(tokens=200)
    query[..., :] += 3 * layer.view()[0][:, :, 7:8].repeat_interleave(3, dim=1)  # every query likes key 7
    keys, values, positions = layer.view()
    _, exact = attend_rows(query, keys, values, positions, AttentionMeta(qpos, 200, layer.scale, key_mass=True))
    est = sampled_mass(layer, query, qpos, stride)
    # every query's probabilities sum to 1, and the samples weigh for all 200 queries of 3 heads
    torch.testing.assert_close(est.sum(dim=-1), torch.full((1, 2), 600.0), rtol=1e-4, atol=1e-3)
    assert est.argmax(dim=-1).tolist() == exact.argmax(dim=-1).tolist() == [[7, 7]]
    if stride == 4:  # a dense sample agrees on most of the top quarter
        top = lambda m: set(m[0, 0].topk(50).indices.tolist())
        assert len(top(est) & top(exact)) >= 40


def test_default_h2o_runs_fused_attention_and_keeps_nearly_what_exact_h2o_keeps(llama):
    ids = prompt_ids(120, seed=3)
    kept = {}
    for stride in (1, 16):
        comp = make_compressor("h2o", ratio=0.5, query_stride=stride)
        assert comp.needs_key_mass == (stride == 1)
        engine = Engine(llama, ToyTokenizer(), comp)
        with engine.adapter.attached():
            cache, _ = engine.prepare(Segments(ids, []))
        kept[stride] = [set(layer.view()[2][0, h].tolist()) for layer in cache.layers for h in range(layer.view()[2].shape[1])]
    overlap = [len(a & b) / len(a) for a, b in zip(kept[1], kept[16])]
    assert min(overlap) >= 0.8, overlap
    with pytest.raises(ConfigError, match="query_stride"):
        make_compressor("h2o", ratio=0.5, query_stride=0)
