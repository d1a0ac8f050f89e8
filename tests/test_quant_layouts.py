"""Quantized layouts beyond plain KIVI: rotated bases, exact attention sinks, ZipVL mixed precision."""

from __future__ import annotations

import math

import pytest
import torch

from slimkv.cache import KVLayer, LayerStates, QuantizedLayer, QuantSpec
from slimkv.cache.attention import AttentionMeta, attend_rows
from slimkv.cache.mixed import MixedLayer
from slimkv.cache.rotation import rotate, rotation, unrotate
from slimkv.compressors import make_compressor
from slimkv.compressors.base import ScoreContext
from slimkv.compressors.eviction.snapkv import SnapKVCompressor
from slimkv.compressors.quantization.zipvl import important_count
from slimkv.compressors.state import QueryWindow
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.errors import ConfigError

from .conftest import ToyTokenizer, prompt_ids
from .test_quantization import dense_layer


def attend(query, keys, values, positions, scale=0.25):
    return attend_rows(query, keys, values, positions, AttentionMeta(torch.full((query.shape[0], 1), 10**6), 0, scale))[0]


# ---------------------------------------------------------------------- rotation
@pytest.mark.parametrize("dim", [16, 64, 24])  # Hadamard, Hadamard, seeded random orthogonal
def test_rotation_is_orthogonal_and_leaves_attention_unchanged(dim):
    r = rotation(dim)
    torch.testing.assert_close(r @ r.T, torch.eye(dim), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(dim)
    q, k, v = (torch.randn(1, 2, n, dim, generator=g) for n in (3, 50, 50))
    pos = torch.arange(50).expand(1, 2, 50)
    plain = attend(q, k, v, pos)
    rotated = unrotate(attend(rotate(q), rotate(k), rotate(v), pos))
    torch.testing.assert_close(rotated, plain, atol=1e-5, rtol=1e-4)


def test_rotation_spreads_an_outlier_channel_and_lowers_2bit_error():
    """Per-token 2-bit values with one huge channel: the rotated basis gives a smaller error."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1, 1, 256, 64, generator=g)
    values[..., 3] *= 40
    layer = KVLayer()
    layer.append(values, values, torch.arange(256)[None], exact=True)
    errs = {}
    for rot in (False, True):
        q = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=64, rotate=rot))
        errs[rot] = float((q.view()[1] - values).pow(2).mean())
    assert errs[True] < 0.5 * errs[False]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_layer_reads_the_same_through_kernel_and_pytorch(bits, dtype):
    from slimkv.cache import KVLayer, kernels

    base = dense_layer(batch=2, heads=2, tokens=150, dim=16)
    keys, values, positions = base.view()
    layer = KVLayer.from_entries(keys.to(dtype), values.to(dtype), positions)
    q = QuantizedLayer.from_layer(layer, QuantSpec(bits=bits, group=32, residual=3, sinks=4, rotate=True))
    q.append(torch.randn(2, 2, 4, 16, dtype=dtype), torch.randn(2, 2, 4, 16, dtype=dtype),
             torch.arange(150, 154).expand(2, 4))
    query = torch.randn(2, 6, 1, 16, dtype=dtype)
    position = torch.tensor([[154], [154]])
    if not kernels.available(query, q):
        pytest.skip("no C compiler: the kernel is not built")
    fused, _ = q.attend(query, AttentionMeta(position, 1, 0.25))
    with kernels.disabled():
        dense, _ = q.attend(query, AttentionMeta(position, 1, 0.25))
    assert fused.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bfloat16 dequantized values round before the products
    torch.testing.assert_close(fused, dense, rtol=tol, atol=tol)


def test_eight_bit_rotated_layer_stays_close_to_the_original():
    layer = dense_layer(tokens=100, dim=16)
    keys, values, _ = layer.view()
    k2, v2, _ = QuantizedLayer.from_layer(layer, QuantSpec(bits=8, group=32, rotate=True)).view()
    assert float((k2 - keys).abs().max()) < 0.01 * float(keys.abs().max())
    assert float((v2 - values).abs().max()) < 0.01 * float(values.abs().max())


# ---------------------------------------------------------------------- sinks
def test_sinks_are_kept_exactly_and_counted_in_bytes():
    layer = dense_layer(tokens=100, dim=16)
    keys, values, positions = layer.view()
    plain = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=32, residual=2))
    q = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=32, residual=2, sinks=4))
    k2, v2, p2 = q.view()
    assert torch.equal(p2, positions) and q.max_length == 100 and q.entries() == 200
    assert torch.equal(k2[:, :, :4], keys[:, :, :4]) and torch.equal(v2[:, :, :4], values[:, :, :4])
    assert q.sink_length == 4 and q.quantized_length == 94 and q.residual.max_length == 2
    # 4 sinks as a dense float32 layer (K, V, int32 positions, lengths) instead of 4 more 2-bit entries
    heads, dim = 2, 16
    sink_bytes = heads * 4 * (2 * dim * 4 + 4) + heads * 8
    codes = heads * 4 * 2 * dim * 2 // 8 + 4 * 2 + heads * 4 * 2 * 2  # codes, shared positions, value params
    key_groups = (math.ceil(94 / 32) - math.ceil(98 / 32)) * heads * dim * 2 * 2
    assert q.nbytes() == plain.nbytes() + sink_bytes - codes + key_groups


def test_sinks_survive_decoding_and_rollback():
    layer = dense_layer(tokens=40, dim=16)
    q = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=8, sinks=3))
    for t in range(40, 80):
        q.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.tensor([[t]]))
    assert q.max_length == 80 and q.sink_length == 3
    assert q.positions[0, 0].tolist() == list(range(80))
    q.truncate(torch.full((1, 2), 75))
    assert q.max_length == 75 and q.positions[0, 0].tolist() == list(range(75))
    assert torch.equal(q.view()[0][:, :, :3], layer.view()[0][:, :, :3])


def test_kivi_settings_are_checked():
    with pytest.raises(ConfigError, match="sinks must be >= 0"):
        make_compressor("kivi2", sinks=-1)
    assert "sinks=4, rotate=True" in make_compressor("kivi2").describe()


# ---------------------------------------------------------------------- ZipVL
def test_important_count_is_the_smallest_set_holding_the_share():
    mass = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert important_count(mass, 0.8).tolist() == [2, 4]  # 0.5 + 0.3; four fifths
    assert important_count(mass, 0.81).tolist() == [3, 5]
    covered = torch.tensor([1.0, 0.0])  # the first row's sinks already hold half of all the mass
    assert important_count(mass, 0.8, covered).tolist() == [2, 4]  # (1 + 0.5) / 2 < 0.8 <= (1.8) / 2
    assert important_count(mass, 0.5, covered).tolist() == [0, 3]


def handmade_layer():
    """32 entries, 1 head; the window's single query attends mostly to entries 10 and 20, recorded as
    SnapKV's observation window (``STATES``, under the key ZipVL reads)."""
    dim = 16
    keys = torch.zeros(1, 1, 32, dim)
    keys[0, 0, 10, 0], keys[0, 0, 20, 0], keys[0, 0, 5, 0] = 6.0, 5.0, 3.0
    values = torch.randn(1, 1, 32, dim, generator=torch.Generator().manual_seed(0))
    layer = KVLayer()
    layer.append(keys, values, torch.arange(32)[None], exact=True)
    query = torch.zeros(1, 1, 1, dim)
    query[..., 0] = 1.0
    STATES.retain(())
    STATES.setdefault(SnapKVCompressor(window=16).state_key, QueryWindow).record(query, torch.tensor([[31]]), 16)
    return layer


STATES = LayerStates()


def test_zipvl_keeps_the_requested_attention_share_at_high_precision():
    layer = handmade_layer()
    comp = make_compressor("zipvl", share=0.9, high_bits=8, sinks=2, group=8)
    ctx = ScoreContext(0, 1, torch.tensor([32]), torch.tensor([32]), "prefill", STATES)
    mass = comp.score(layer, ctx)[0, 0]  # [32]
    torch.testing.assert_close(mass.sum(), torch.tensor(1.0))
    out = comp.compress(layer, ctx)
    assert isinstance(out, MixedLayer) and out.high.spec.bits == 8 and out.low.spec.bits == 2
    high = out.high.positions[0, 0].tolist()
    order = mass[2:].argsort(descending=True) + 2  # candidates: all but the 2 sinks
    need = next(i + 1 for i in range(30) if mass[:2].sum() + mass[order[: i + 1]].sum() >= 0.9)
    assert sorted(high) == sorted(order[:need].tolist()) and {10, 20} <= set(high)
    assert mass[:2].sum() + mass[high].sum() >= 0.9  # the share is held ...
    assert mass[:2].sum() + mass[high[:-1]].sum() < 0.9 or len(high) == 1  # ... by the fewest entries
    assert out.max_length == 32 and out.low.sink_length == 2
    assert sorted(out.positions[0, 0].tolist()) == list(range(32))
    assert out.nbytes() == out.high.nbytes() + out.low.nbytes()


def test_zipvl_configuration_errors():
    with pytest.raises(ConfigError, match="share must be in"):
        make_compressor("zipvl", share=1.5)
    with pytest.raises(ConfigError, match="high_bits must be one of"):
        make_compressor("zipvl", high_bits=3)
    with pytest.raises(ConfigError, match="must be at least low_bits"):
        make_compressor("zipvl", high_bits=2, low_bits=4)
    with pytest.raises(ConfigError, match="takes no ratio"):
        make_compressor("zipvl", ratio=0.5)


def test_zipvl_generates_with_bytes_between_its_two_widths(llama):
    ids = prompt_ids(160, seed=2)
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    sizes = {}
    for name, params in (("kivi2", {}), ("zipvl", {"share": 0.9}), ("kivi8", {})):
        engine = Engine(llama, ToyTokenizer(), make_compressor(name, group=16, **params))
        result = engine.generate(Segments(ids, []), config)
        assert len(result.token_ids) == 6
        sizes[name] = result.cache_after_prefill.bytes_kept
    assert sizes["kivi2"] < sizes["zipvl"] < sizes["kivi8"]


def test_mixed_layer_decodes_and_rolls_back():
    layer = handmade_layer()
    comp = make_compressor("zipvl", share=0.9, sinks=2, group=8)
    ctx = ScoreContext(0, 1, torch.tensor([32]), torch.tensor([32]), "prefill", STATES)
    out = comp.compress(layer, ctx)
    for t in range(32, 40):
        out.append(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16), torch.tensor([[t]]))
    assert out.max_length == out.entries() == 40
    out.truncate(torch.tensor([[36]]))
    assert sorted(out.positions[0, 0].tolist()) == list(range(36))
    copy = out.clone()
    copy.append(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16), torch.tensor([[36]]))
    assert out.max_length == 36 and copy.max_length == 37
