"""Layer budget schedules (PyramidKV): falling with depth, same total, capped at the tokens seen."""

from __future__ import annotations

import pytest
import torch

from slimkv.compressors import make_compressor
from slimkv.compressors.schedules import pyramid
from slimkv.engine import Engine, Segments
from slimkv.errors import ConfigError

from .conftest import ToyTokenizer, prompt_ids


def test_pyramid_falls_with_depth_and_keeps_the_total():
    budgets = pyramid(torch.tensor([100, 40]), torch.tensor([1000, 1000]), 30, beta=20)[:, 0]
    assert budgets.tolist() == sorted(budgets.tolist(), reverse=True)
    assert budgets[0] == 195 and budgets[-1] == 5
    assert abs(int(budgets.sum()) - 3000) < 30


def test_pyramid_hands_what_capped_layers_cannot_hold_to_the_others():
    budgets = pyramid(torch.tensor([80]), torch.tensor([100]), 10, beta=20)[:, 0]  # ratio 0.2
    assert int(budgets.max()) == 100  # never more than the tokens seen
    assert abs(int(budgets.sum()) - 800) < 10  # the total still holds
    assert budgets.tolist() == sorted(budgets.tolist(), reverse=True)


def test_any_method_takes_the_pyramid_schedule(llama):
    engine = Engine(llama, ToyTokenizer(), make_compressor("knorm", ratio=0.5, schedule="pyramid", beta=4))
    with engine.adapter.attached():
        cache, _ = engine.prepare(Segments(prompt_ids(80), []))
    lengths = [int(layer.lengths.max()) for layer in cache.layers]
    assert lengths[0] > lengths[-1] and sum(lengths) == pytest.approx(40 * len(lengths), abs=len(lengths))
    assert [int(layer.capacity) for layer in cache.layers] == lengths  # real bytes per layer


@pytest.mark.parametrize("kw", [{"schedule": "zigzag"}, {"schedule": "pyramid", "beta": 0.5}])
def test_bad_schedule_is_a_config_error(kw):
    with pytest.raises(ConfigError):
        make_compressor("snapkv", ratio=0.5, **kw)
