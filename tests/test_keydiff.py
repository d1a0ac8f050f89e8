"""KeyDiff keeps the distinctive key among near-duplicates (the needle among repeated filler)."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import KVLayer
from slimkv.compressors import ScoreContext, make_compressor


@pytest.mark.parametrize("anchors", [1, 2, 4, 8])  # a lone outlier never becomes a reference centre
def test_distinctive_key_outranks_repeated_ones(anchors):
    n, dim = 40, 8
    gen = torch.Generator().manual_seed(0)
    filler = torch.randn(dim, generator=gen)
    keys = filler + 0.05 * torch.randn(1, 1, n, dim, generator=gen)
    keys[0, 0, 17] = torch.randn(dim, generator=gen)  # the needle
    layer = KVLayer()
    layer.append(keys, torch.zeros_like(keys), torch.arange(n)[None], exact=True)
    comp = make_compressor("keydiff", ratio=0.75, sinks=2, window=4, anchors=anchors)
    ctx = ScoreContext(layer_idx=0, num_layers=1, keep=torch.tensor([10]), seen=torch.tensor([n]), phase="prefill")
    comp.compress(layer, ctx)
    kept = sorted(layer.view()[2][0, 0].tolist())
    assert len(kept) == 10
    assert 17 in kept and {0, 1, 36, 37, 38, 39} <= set(kept)


def _ctx(keep: int, seen: int) -> ScoreContext:
    return ScoreContext(layer_idx=0, num_layers=1, keep=torch.tensor([keep]), seen=torch.tensor([seen]),
                        phase="prefill")


def _layer(keys: torch.Tensor) -> KVLayer:
    layer = KVLayer()
    layer.append(keys, torch.zeros_like(keys), torch.arange(keys.shape[2])[None], exact=True)
    return layer


def test_shared_heads_keep_the_same_tokens_and_each_head_follows_its_own_keys():
    n, dim = 40, 8
    gen = torch.Generator().manual_seed(1)
    filler = torch.randn(2, 1, dim, generator=gen)
    keys = (filler + 0.05 * torch.randn(2, n, dim, generator=gen))[None]  # [1, 2, n, D]
    keys[0, 0, 11] = torch.randn(dim, generator=gen)  # an outlier in head 0 only
    keys[0, 1, 23] = torch.randn(dim, generator=gen)  # an outlier in head 1 only
    each = _layer(keys)
    make_compressor("keydiff", ratio=0.75, sinks=0, window=0, heads="each").compress(each, _ctx(1, n))
    assert each.view()[2][0, :, 0].tolist() == [11, 23]  # every head keeps its own outlier
    shared = _layer(keys)
    make_compressor("keydiff", ratio=0.75, sinks=0, window=0).compress(shared, _ctx(2, n))
    pos = shared.view()[2][0]
    assert pos[0].tolist() == pos[1].tolist() == [11, 23]  # both outliers, in both heads


def test_head_mean_matches_tokens_by_position_when_rows_differ():
    from slimkv.compressors.eviction.keydiff import _head_mean

    score = torch.tensor([[[1.0, 2.0, 3.0], [10.0, 30.0, 0.0]]])  # [1, 2, 3]
    layer = KVLayer()
    layer.append(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.arange(3)[None], exact=True)
    layer.positions[0, 1] = torch.tensor([0, 2, 1], dtype=torch.int32)  # head 1 holds the tokens reordered
    layer.lengths[0, 1] = 2  # ... and only two of them (slot 2 is free)
    layer._uniform = False
    mean = _head_mean(score, layer.view()[2], layer)
    # token 0: (1 + 10) / 2; token 2: (3 + 30) / 2; token 1: only head 0 holds it
    assert mean[0, 0].tolist() == [5.5, 2.0, 16.5]
    assert mean[0, 1, :2].tolist() == [5.5, 16.5]


def test_bad_heads_setting_is_a_config_error():
    from slimkv.errors import ConfigError

    with pytest.raises(ConfigError, match="heads"):
        make_compressor("keydiff", ratio=0.5, heads="max")

    with pytest.raises(ConfigError, match="anchors"):
        make_compressor("keydiff", ratio=0.5, anchors=0)


def test_several_anchors_see_a_second_cluster_as_typical():
    # two clouds of keys (25 near e0, 14 near e1) and one key between them: one mean direction finds
    # the in-between key typical and the smaller cloud unusual; two centres find the reverse
    gen = torch.Generator().manual_seed(2)
    dim = 8
    eye = torch.eye(dim)
    keys = torch.cat([eye[0] + 0.05 * torch.randn(25, dim, generator=gen),
                      eye[1] + 0.05 * torch.randn(14, dim, generator=gen),
                      (eye[0] + eye[1])[None]])[None, None]  # [1, 1, 40, D]; the odd one is 39
    kept = {}
    for anchors in (1, 2):
        layer = _layer(keys)
        make_compressor("keydiff", ratio=0.9, sinks=0, window=0, anchors=anchors).compress(layer, _ctx(1, 40))
        kept[anchors] = int(layer.view()[2][0, 0, 0])
    assert 25 <= kept[1] < 39 and kept[2] == 39


def test_longer_rows_get_more_centres():
    from slimkv.errors import ConfigError

    comp = make_compressor("keydiff", ratio=0.5)  # 4 centres, one more per 512 entries beyond 2,048
    assert [comp.centres(n) for n in (100, 2048, 2049, 4000, 8192)] == [4, 4, 5, 8, 16]
    assert make_compressor("keydiff", ratio=0.5, keys_per_anchor=0).centres(8192) == 4
    assert make_compressor("keydiff", ratio=0.5, anchors=1).centres(8192) == 1  # the paper's mean direction
    with pytest.raises(ConfigError, match="keys_per_anchor"):
        make_compressor("keydiff", ratio=0.5, keys_per_anchor=-1)
