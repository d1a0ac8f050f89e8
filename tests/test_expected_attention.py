"""Expected Attention: query statistics are recovered before RoPE, the RoPE average is right, and the
score is the softmax of the expected logit times the value norm."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import KVLayer, LayerStates
from slimkv.cache.vq_codes import rope
from slimkv.compressors import make_compressor
from slimkv.compressors.base import ScoreContext
from slimkv.compressors.eviction.expected_attention import RopeTable, mean_rotation
from slimkv.compressors.state import QueryStats
from slimkv.errors import ConfigError

D = 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))


TABLE = RopeTable([INV_FREQ.float()], [1.0])


def _ctx(seen: int, keep: int = 4, states: LayerStates | None = None) -> ScoreContext:
    return ScoreContext(layer_idx=0, num_layers=1, keep=torch.tensor([keep]), seen=torch.tensor([seen]),
                        phase="prefill", states=states if states is not None else LayerStates(), bound=TABLE)


def test_mean_rotation_is_the_average_of_the_rotations():
    x = torch.randn(3, D, dtype=torch.float64)
    pos = torch.arange(100, 132, dtype=torch.float64)
    rotated = torch.stack([rope(x, torch.full((3,), float(p)), INV_FREQ.float()).double() for p in pos]).mean(0)
    torch.testing.assert_close(x @ mean_rotation(INV_FREQ, 100, 32).T, rotated, atol=1e-5, rtol=1e-5)


def test_observe_recovers_pre_rope_statistics():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(1, 2, 20, D, generator=g, dtype=torch.float64) + 2.0  # [B, Hq, T, D]
    pos = torch.arange(20)[None]
    post = rope(pre.float(), pos[:, None, :], INV_FREQ.float())
    comp = (make_compressor("expected_attention", ratio=0.5, sinks=4))
    layer, states = KVLayer(), LayerStates()
    comp.observe(layer, _ctx(10, states=states), post[:, :, :10], pos[:, :10], None)  # two chunks accumulate
    comp.observe(layer, _ctx(20, states=states), post[:, :, 10:], pos[:, 10:], None)
    kept = pre[:, :, 4:]  # the sinks' queries are left out
    stats = states.get(comp.state_key, QueryStats)
    torch.testing.assert_close(stats.total, kept.sum(2), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.outer, kept.transpose(-1, -2) @ kept, atol=1e-3, rtol=1e-5)
    assert float(stats.count) == 16


def test_score_is_expected_attention_times_value_norm():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(1, 2, 30, D, generator=g, dtype=torch.float64)  # 2 query heads, one KV head
    pos = torch.arange(30)[None]
    post = rope(pre.float(), pos[:, None, :], INV_FREQ.float())
    keys = torch.randn(1, 1, 30, D, generator=g)
    values = torch.randn(1, 1, 30, D, generator=g)
    for covariance in (False, True):
        comp = (make_compressor("expected_attention", ratio=0.5, sinks=2, future=16, covariance=covariance))
        layer = KVLayer()
        layer.append(keys, values, pos)
        layer.scale = 0.5
        states = LayerStates()
        comp.observe(layer, _ctx(30, states=states), post, pos, None)
        got = comp.score(layer, _ctx(30, states=states))[0, 0]
        q = pre[0, :, 2:]  # [Hq, n, D]
        mu = q.mean(1)
        cov = torch.einsum("hni,hnj->hij", q - mu[:, None], q - mu[:, None]) / q.shape[1]
        rot = mean_rotation(INV_FREQ, 30, 16)
        k = keys[0, 0].double()
        logits = 0.5 * (mu @ rot.T) @ k.T  # [Hq, L]
        if covariance:
            sigma = rot @ cov @ rot.T
            logits = logits + 0.5 * 0.25 * torch.einsum("ld,hde,le->hl", k, sigma, k)
        want = logits.softmax(-1).mean(0) * values[0, 0].double().norm(dim=-1)
        torch.testing.assert_close(got[2:].double(), want[2:], rtol=1e-4, atol=1e-6)
        assert torch.isinf(got[:2]).all()  # sinks always kept


def test_bad_settings_and_unbound_use_are_clear():
    with pytest.raises(ConfigError, match="future"):
        make_compressor("expected_attention", ratio=0.5, future=0)
    comp = make_compressor("expected_attention", ratio=0.5)
    unbound = ScoreContext(0, 1, torch.tensor([4]), torch.tensor([4]), "prefill")
    with pytest.raises(ConfigError, match="bind"):
        comp.observe(KVLayer(), unbound, torch.zeros(1, 1, 4, D), torch.arange(4)[None], None)
