"""Compressor configuration errors are raised at configuration time with a usable message."""

from __future__ import annotations

import pytest

from slimkv.compressors import make_compressor, names
from slimkv.errors import ConfigError


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range(ratio):
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
        make_compressor("snapkv", ratio=ratio)


@pytest.mark.parametrize("budget", [0, -3, 2.5])
def test_budget_below_one(budget):
    with pytest.raises(ConfigError, match="budget must be"):
        make_compressor("knorm", budget=budget)


def test_unknown_compressor_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        make_compressor("nope")
    for name in names():
        assert name in str(err.value)


def test_unknown_parameter_and_phase():
    with pytest.raises(ConfigError, match="no parameter"):
        make_compressor("snapkv", ratio=0.5, windw=3)
    with pytest.raises(ConfigError, match="does not support the decode phase"):
        make_compressor("snapkv", ratio=0.5, phase="decode")
    with pytest.raises(ConfigError, match="either a ratio or a budget"):
        make_compressor("knorm", ratio=0.5, budget=3)


def test_keep_counts_follow_kvpress_convention():
    import torch

    comp = make_compressor("knorm", ratio=0.75)
    assert comp.keep_for(torch.tensor([100, 7])).tolist() == [25, 1]
    assert make_compressor("knorm", budget=10).keep_for(torch.tensor([4, 50])).tolist() == [4, 10]
