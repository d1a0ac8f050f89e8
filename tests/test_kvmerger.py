"""KVMerger: runs of similar adjacent keys, pivots, Gaussian-weighted merging, and its compositions."""

from __future__ import annotations

import math

import pytest
import torch

from slimkv import compressors
from slimkv.cache import KVLayer
from slimkv.compressors import Pipeline, make_compressor
from slimkv.compressors.base import ScoreContext
from slimkv.compressors.compose import RankAverage
from slimkv.compressors.merging.kvmerger import find_runs
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.errors import ConfigError

from .conftest import ToyTokenizer, prompt_ids

# key directions by position: runs {0,1,2}, {3}, {4,5}, {6}, {7} (7 points like 0-2 but is not adjacent)
DIRS = [0, 0, 0, 1, 2, 2, 3, 0]


def handmade_layer(shuffle: bool = False) -> KVLayer:
    """8 entries, head_dim 4: keys along DIRS (slightly perturbed), value of entry i = i everywhere."""
    keys = torch.zeros(1, 1, 8, 4)
    for i, d in enumerate(DIRS):
        keys[0, 0, i, d] = 1.0 + 0.1 * i
    keys[0, 0, 1, 1], keys[0, 0, 2, 1] = 0.05, -0.05
    values = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 4).clone()
    positions = torch.arange(8)
    if shuffle:  # slots in storage need not be in position order (decode-phase eviction reorders them)
        perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
        keys, values, positions = keys[:, :, perm], values[:, :, perm], positions[perm]
    layer = KVLayer()
    layer.append(keys, values, torch.zeros(1, 8, dtype=torch.long), exact=True)
    layer.positions[0, 0] = positions.to(torch.int32)
    return layer


def ctx(keep: int, seen: int = 8) -> ScoreContext:
    return ScoreContext(0, 1, torch.tensor([keep]), torch.tensor([seen]), "prefill")


def by_position(layer: KVLayer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    keys, values, positions = layer.view()
    return {int(p): (keys[0, 0, i], values[0, 0, i]) for i, p in enumerate(positions[0, 0])}


@pytest.mark.parametrize("shuffle", [False, True])
def test_runs_of_similar_adjacent_keys(shuffle):
    layer = handmade_layer(shuffle)
    keys, _, positions = layer.view()
    runs = find_runs(keys, positions, None, threshold=0.9)
    in_order = positions.gather(-1, runs.order)[0, 0].tolist()
    assert in_order == list(range(8))
    assert runs.run[0, 0].tolist() == [0, 0, 0, 1, 2, 2, 3, 4]
    assert find_runs(keys, positions, None, threshold=1.0).run[0, 0].tolist() == list(range(8))
    assert find_runs(keys, positions, None, threshold=-1.0).run[0, 0].tolist() == [0] * 8


@pytest.mark.parametrize("shuffle", [False, True])
def test_pivots_and_gaussian_weights(shuffle):
    """Budget 4 of 5 runs: the weakest run (0-2) goes whole; the pair 4-5 merges into its pivot."""
    layer = handmade_layer(shuffle)
    comp = make_compressor("kvmerger", budget=4, window=1, threshold=0.9)
    # no observed queries: importance = distinctiveness (minus cosine to the mean key); last token pinned
    imp = comp.importance(layer, ctx(4))
    positions = layer.view()[2]
    imp_by_pos = imp[0, 0, positions[0, 0].argsort()]
    assert imp_by_pos[7] == float("inf") and bool(imp_by_pos[:7].isfinite().all())
    comp.compress(layer, ctx(4))
    kept = by_position(layer)
    assert sorted(kept) == [3, 4, 6, 7]  # pivots of the four strongest runs, original positions
    assert layer.capacity == 4 and layer.nbytes() == 4 * (2 * 4 * 4 + 4) + 8  # storage really shrank
    # 5 merged into 4: w = exp(-d^2 / (2 sigma^2)) with sigma^2 = d^2 (its only member), so exp(-1/2)
    w = math.exp(-0.5)
    k4 = torch.tensor([0.0, 0.0, 1.4, 0.0])
    k5 = torch.tensor([0.0, 0.0, 1.5, 0.0])
    torch.testing.assert_close(kept[4][1], torch.full((4,), (4 + w * 5) / (1 + w)))
    torch.testing.assert_close(kept[4][0], (k4 + w * k5) / (1 + w))
    for p in (3, 6, 7):  # runs of one: untouched
        assert kept[p][1].tolist() == [float(p)] * 4


def test_merged_value_is_the_kernel_weighted_mean_of_its_run():
    """One run of four keys at different distances from the pivot; budget 1 keeps the pivot."""
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, -0.1], [1.0, 0.4]]).view(1, 1, 4, 2)
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]]).view(1, 1, 4, 1).expand(1, 1, 4, 2).clone()
    layer = KVLayer()
    layer.append(keys, values, torch.arange(4)[None], exact=True)
    comp = make_compressor("kvmerger", budget=1, threshold=0.5, merge_keys=False, sigma=2.0, window=1)
    assert find_runs(keys, torch.arange(4).view(1, 1, 4), None, 0.5).run[0, 0].tolist() == [0, 0, 0, 0]
    pivot = 3  # the last token (the fallback's recent window) is pinned, so it is the run's pivot
    comp.compress(layer, ctx(1, seen=4))
    assert layer.view()[2][0, 0].tolist() == [pivot]
    # each freed entry merges into its nearest kept neighbour of the run: the pivot
    d2 = ((keys[0, 0] - keys[0, 0, pivot]) ** 2).sum(-1)
    others = [i for i in range(4) if i != pivot]
    var = 2.0 * d2[others].mean()
    w = torch.exp(-d2 / (2 * var))
    w[pivot] = 1.0
    expected = (w * values[0, 0, :, 0]).sum() / w.sum()
    torch.testing.assert_close(layer.view()[1][0, 0, 0], torch.full((2,), float(expected)))
    torch.testing.assert_close(layer.view()[0][0, 0, 0], keys[0, 0, pivot])  # merge_keys=False


def test_threshold_one_is_plain_eviction_by_the_same_scores():
    layer, plain = handmade_layer(), handmade_layer()
    comp = make_compressor("kvmerger", budget=3, threshold=1.0)
    comp.compress(layer, ctx(3))
    positions = layer.view()[2][0, 0].tolist()
    ref = by_position(plain)
    for p, (k, v) in by_position(layer).items():  # nothing merged: kept entries are bit-exact
        assert torch.equal(k, ref[p][0]) and torch.equal(v, ref[p][1])
    assert len(set(positions)) == 3


def test_snapkv_plus_kvmerger_keeps_snapkv_choice_and_merges_the_rest(llama):
    ids = prompt_ids(80, seed=3)
    snap = Engine(llama, ToyTokenizer(), make_compressor("snapkv", ratio=0.75))
    # threshold -1: every freed entry merges into its nearer kept neighbour (a random model's adjacent
    # keys are rarely similar enough for the default threshold)
    pipe = Pipeline(stages=(make_compressor("snapkv", ratio=0.75),
                            make_compressor("kvmerger", ratio=0.75, threshold=-1.0)))
    assert pipe.name == make_compressor("snapkv+kvmerger", ratio=0.75).name
    both = Engine(llama, ToyTokenizer(), pipe)
    full = Engine(llama, ToyTokenizer(), make_compressor("none"))
    with snap.adapter.attached():
        a, _ = snap.prepare(Segments(ids, []))
        b, _ = both.prepare(Segments(ids, []))
        ref, _ = full.prepare(Segments(ids, []))
    changed = 0
    for la, lb, lr in zip(a.layers, b.layers, ref.layers):
        assert lb.nbytes() == la.nbytes()  # same bytes: merged entries take no room
        assert torch.equal(la.view()[2], lb.view()[2])  # the same kept positions: SnapKV chose them
        torch.testing.assert_close(lb.view()[1].shape, la.view()[1].shape)
        changed += int((lb.view()[1] != la.view()[1]).any(-1).sum())
    assert changed > 0  # freed entries were merged into kept ones
    # merged values are convex combinations: within the per-channel range of the full cache's values
    for lb, lr in zip(b.layers, ref.layers):
        lo, hi = lr.view()[1].amin(2, keepdim=True), lr.view()[1].amax(2, keepdim=True)
        assert bool((lb.view()[1] >= lo - 1e-5).all() and (lb.view()[1] <= hi + 1e-5).all())


def test_three_stage_pipeline_generates(llama):
    engine = Engine(llama, ToyTokenizer(), make_compressor("snapkv+kvmerger+kivi2", ratio=0.5))
    result = engine.generate(Segments(prompt_ids(90), []), GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert len(result.token_ids) == 4
    assert abs(result.cache_after_prefill.tokens_kept - 45) <= 1
    assert result.cache_after_prefill.bytes_kept < result.cache_after_prefill.bytes_full / 2


def test_eviction_plus_eviction_is_a_rank_average(llama):
    pipe = make_compressor("snapkv+keydiff", ratio=0.5)
    step, merger = pipe._plan[0]
    assert isinstance(step, RankAverage) and merger is None and len(pipe._plan) == 1
    layer = handmade_layer()
    a, b = make_compressor("knorm", budget=4), make_compressor("keydiff", budget=4, sinks=0, window=0)
    avg = RankAverage(members=(a, b))
    sa, sb = a.score(layer, ctx(4)), b.score(layer, ctx(4))
    expected = (sa.argsort(-1).argsort(-1) + sb.argsort(-1).argsort(-1)).float() / 16
    torch.testing.assert_close(avg.score(layer, ctx(4)), expected)
    engine = Engine(llama, ToyTokenizer(), pipe)
    with engine.adapter.attached():
        cache, _ = engine.prepare(Segments(prompt_ids(60), []))
    assert cache.stats().tokens_kept == 30
    last = set(range(52, 60))  # keydiff's window (8) and snapkv's window (16) stay kept
    assert last <= set(cache.layers[0].view()[2][0, 0].tolist())


@pytest.mark.parametrize("name, phase, match", [
    ("kvmerger+snapkv", None, "must come before"),
    ("kvmerger+kvmerger", None, "at most one merging"),
    ("snapkv+kivi2+kvmerger", None, "must come before"),
    ("kivi2+snapkv", None, "must come before"),
    ("kvmerger", "decode", "does not support the decode phase"),
    ("h2o+keydiff", "both", "averaging their ranks once"),
    ("h2o+kvmerger", "both", "does not support the decode phase"),
])
def test_incompatible_compositions_fail_at_configuration(name, phase, match):
    with pytest.raises(ConfigError, match=match):
        make_compressor(name, ratio=0.5, phase=phase)


def test_merging_after_a_decode_phase_evictor_is_rejected():
    with pytest.raises(ConfigError, match="one entry per step"):
        Pipeline(stages=(make_compressor("h2o", ratio=0.5, phase="both"), make_compressor("kvmerger", ratio=0.5)))


@pytest.mark.parametrize("bad, match", [
    (dict(threshold=1.5), r"threshold .* \[-1, 1\]"),
    (dict(sigma=0.0), "sigma"),
    (dict(window=0), "window"),
    (dict(kernel=4), "kernel"),
])
def test_bad_settings_fail_at_configuration(bad, match):
    with pytest.raises(ConfigError, match=match):
        make_compressor("kvmerger", ratio=0.5, **bad)


def test_registered_as_merging():
    info = compressors.method_info("kvmerger")
    assert info.kind == "merging" and "2407.08454" in info.paper
    assert {"threshold", "merge_keys", "sigma"} <= set(info.params)
