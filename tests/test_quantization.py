"""KIVI quantization: packing, error bounds, exact bytes, decode-time groups, composition, batching."""

from __future__ import annotations

import math

import pytest
import torch

from slimkv.cache import KVLayer, QuantizedLayer, QuantSpec
from slimkv.cache.attention import AttentionMeta
from slimkv.cache.packing import pack, quantize, unpack
from slimkv.cache.quantized import ROLLBACK_SLACK
from slimkv.compressors import Pipeline, make_compressor
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.errors import ConfigError

from .conftest import ToyTokenizer, prompt_ids


def dense_layer(batch=1, heads=2, tokens=300, dim=16, seed=0, start=0) -> KVLayer:
    g = torch.Generator().manual_seed(seed)
    layer = KVLayer()
    keys = torch.randn(batch, heads, tokens, dim, generator=g) * 3
    keys[..., 1] += 20  # an outlier channel, as keys have
    values = torch.randn(batch, heads, tokens, dim, generator=g)
    layer.append(keys, values, torch.arange(start, start + tokens).expand(batch, tokens), exact=True)
    return layer


# ---------------------------------------------------------------------- packing and quantization
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_rejects_bad_widths():
    with pytest.raises(ValueError, match="divisible by 4"):
        pack(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(8, dtype=torch.uint8), 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_is_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(50, 8, 32, generator=g) * torch.logspace(-3, 3, 8)[None, :, None]
    x[0, 0] = 1.5  # a constant group: exact up to the float16 zero point
    q = quantize(x, bits)
    assert q.codes.max() <= 2**bits - 1 and q.scale.dtype == torch.float16
    err = (x - q.dequantize()).abs()
    bound = q.scale.float() / 2 + 1e-6 * x.abs().amax(dim=-1, keepdim=True) + 1e-3 * (q.scale == 0)
    assert bool((err <= bound).all())
    assert float(err[0, 0].max()) < 1e-3


# ---------------------------------------------------------------------- the quantized layer
def test_bytes_are_exact():
    spec = QuantSpec(bits=2, group=32, residual=10)
    layer = dense_layer(tokens=300, dim=16)
    q = QuantizedLayer.from_layer(layer, spec)
    B, H, D, Q, R = 1, 2, 16, 290, 10
    groups = math.ceil(Q / 32)
    expected = (
        2 * B * H * Q * D * 2 // 8  # packed key and value codes
        + 2 * B * H * groups * D * 2  # key scale and zero (float16), per channel per group
        + 2 * B * H * Q * (D // 16) * 2  # value scale and zero, per token per 16 channels
        + B * 1 * Q * 2  # positions: int16, shared by the heads
        + B * H * 8  # lengths
        + (2 * B * H * R * D * 4 + B * H * R * 4 + B * H * 8)  # residual: float32 K/V, int32 positions, lengths
    )
    assert q.nbytes() == expected
    assert q.quantized_length == Q and q.residual.max_length == R and q.k_pad == groups * 32 - Q
    assert q.entries() == H * 300


def test_wider_keys_cost_their_bits_and_shrink_the_key_error():
    layer = dense_layer(tokens=300, dim=16)
    narrow = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=32))
    wide = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=32, key_bits=4))
    assert wide.k_codes.shape[-1] == 2 * narrow.k_codes.shape[-1] and wide.v_codes.shape == narrow.v_codes.shape
    assert wide.nbytes() - narrow.nbytes() == 300 * 2 * 16 * 2 // 8  # 2 more bits per key element
    keys, values, _ = layer.view()
    (k2, v2, _), (k4, v4, _) = narrow.view(), wide.view()
    assert float((k4 - keys).abs().mean()) < float((k2 - keys).abs().mean()) / 2
    assert torch.equal(v4, v2)


def test_dequantized_entries_are_within_each_groups_bound():
    spec = QuantSpec(bits=4, group=32, residual=5)
    layer = dense_layer(tokens=101, dim=16)
    keys, values, positions = layer.view()
    q = QuantizedLayer.from_layer(layer, spec)
    k2, v2, p2 = q.view()
    assert torch.equal(p2, positions)
    n = q.quantized_length
    k_scale = q.k_scale.float().repeat_interleave(32, dim=2)[:, :, q.k_pad : q.k_pad + n]  # [B, H, n, D]
    assert bool(((keys[:, :, :n] - k2[:, :, :n]).abs() <= k_scale / 2 + 1e-4).all())
    v_scale = q.v_scale.float().repeat_interleave(16, dim=-1)  # [B, H, n, D]
    assert bool(((values[:, :, :n] - v2[:, :, :n]).abs() <= v_scale / 2 + 1e-5).all())
    assert torch.equal(k2[:, :, n:], keys[:, :, n:]) and torch.equal(v2[:, :, n:], values[:, :, n:])


def test_decode_groups_match_quantizing_at_once():
    """Entries quantized as their group fills get the same codes as a layer quantized in one go."""
    spec = QuantSpec(bits=2, group=16, residual=4)
    whole = dense_layer(tokens=84, dim=16)
    keys, values, positions = whole.view()
    start = KVLayer()
    start.append(keys[:, :, :36], values[:, :, :36], positions[:, 0, :36], exact=True)
    grown = QuantizedLayer.from_layer(start, spec)  # 32 quantized + 4 residual
    for t in range(36, 84):
        grown.append(keys[:, :, t : t + 1], values[:, :, t : t + 1], positions[:, 0, t : t + 1])
        held = grown.quantized_length + grown.residual.max_length
        assert held == t + 1 and grown.residual.max_length <= spec.residual + spec.group + ROLLBACK_SLACK
    grown.append(keys[:, :, :0], values[:, :, :0], positions[:, 0, :0])  # flushes the last full group
    first = KVLayer()  # the 68 oldest tokens: 64 quantized + 4 residual, the groups `grown` has
    first.append(keys[:, :, :68], values[:, :, :68], positions[:, 0, :68], exact=True)
    once = QuantizedLayer.from_layer(first, spec)
    assert grown.quantized_length == once.quantized_length == 64
    for name in ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "positions_q"):
        assert torch.equal(getattr(grown, name), getattr(once, name)), name


def test_positions_are_per_head_after_eviction_and_widen_past_int16():
    layer = dense_layer(tokens=40, dim=16, start=40000)
    q = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=8))
    assert q.positions_q.dtype == torch.int32 and q.positions_q.shape[1] == 1
    layer = dense_layer(tokens=40, dim=16)
    layer.keep(torch.stack([torch.arange(0, 40, 2), torch.arange(1, 40, 2)])[None])  # heads keep different entries
    q = QuantizedLayer.from_layer(layer, QuantSpec(bits=2, group=8))
    assert q.positions_q.dtype == torch.int16 and q.positions_q.shape == (1, 2, 20)
    assert torch.equal(q.positions, layer.view()[2])


def test_quantized_layer_refuses_eviction():
    q = QuantizedLayer.from_layer(dense_layer(tokens=20, dim=16), QuantSpec(bits=2, group=8))
    with pytest.raises(RuntimeError, match="evict before quantizing"):
        q.keep(torch.zeros(1, 2, 3, dtype=torch.long))


# ---------------------------------------------------------------------- through the engine
def step(engine, cache, token: int):
    """One decode step over ``cache`` with the engine's compressor; logits [1, vocab]."""
    return engine.runner.forward([engine.runner.row(cache, [token], engine.compressor, "decode")])[:, -1]


def greedy_logits(engine, ids, steps):
    cache, last = engine.prepare(Segments(ids, []))
    logits = [last]
    for _ in range(steps):
        logits.append(step(engine, cache, int(logits[-1].argmax(-1))))
    return torch.cat(logits), cache


def test_eight_bits_gives_logits_close_to_the_full_cache(llama):
    ids = prompt_ids(200, seed=1)
    full, _ = greedy_logits(Engine(llama, ToyTokenizer()), ids, steps=20)
    for name, tol in (("kivi8", 0.02), ("kivi4", 0.3)):
        got, cache = greedy_logits(Engine(llama, ToyTokenizer(), make_compressor(name, group=32)), ids, steps=20)
        assert all(isinstance(layer, QuantizedLayer) for layer in cache.layers)
        err = (got - full).abs().max() / full.abs().max()
        assert err < tol, (name, float(err))


def test_decode_tokens_wait_in_the_residual_until_a_group_fills(llama):
    engine = Engine(llama, ToyTokenizer(), make_compressor("kivi2", group=16, residual=3, sinks=0))
    sizes = []
    cache, logits = engine.prepare(Segments(prompt_ids(50), []))
    layer = cache.layers[0]
    sizes.append((layer.quantized_length, layer.residual.max_length))
    for _ in range(40):
        logits = step(engine, cache, int(logits.argmax(-1)))
        sizes.append((layer.quantized_length, layer.residual.max_length))
    assert sizes[0] == (47, 3)  # the prompt is quantized but for `residual` tokens
    # new tokens wait until a group is full beyond `residual` + ROLLBACK_SLACK (speculative rollback) ...
    assert sizes[32] == (47, 3 + ROLLBACK_SLACK + 16)
    assert sizes[33] == (63, 3 + ROLLBACK_SLACK + 1)  # ... and are quantized as one group at the next append
    assert max(r for _, r in sizes) <= 3 + ROLLBACK_SLACK + 16
    assert all(q + r == 50 + i for i, (q, r) in enumerate(sizes))
    assert cache.layers[0] is layer and layer.positions.max() == 89


def test_snapkv_then_kivi_quantizes_what_snapkv_keeps(llama):
    ids = prompt_ids(120, seed=3)
    evict = Engine(llama, ToyTokenizer(), make_compressor("snapkv", ratio=0.5))
    both = Engine(llama, ToyTokenizer(), make_compressor("snapkv+kivi8", ratio=0.5))
    ref, _ = evict.prepare(Segments(ids, []))
    cache, _ = both.prepare(Segments(ids, []))
    for dense, q in zip(ref.layers, cache.layers):
        keys, values, positions = dense.view()
        k2, v2, p2 = q.view()
        assert isinstance(q, QuantizedLayer) and torch.equal(p2, positions)
        assert torch.allclose(k2, keys, atol=0.05 * float(keys.abs().max()))
    stats, dense_stats = cache.stats(), ref.stats()
    sinks = 4 * dense_stats.bytes_kept / 60  # the 4 attention sinks stay dense
    assert stats.tokens_kept == 60 and stats.bytes_kept < dense_stats.bytes_kept / 3 + sinks


@pytest.mark.parametrize("bad, message", [
    ("kivi2+snapkv", "must come before kivi2"),
    ("kivi2+kivi4", "both quantization methods"),
    ("snapkv+kvmerger+kvmerger", "at most one merging method"),  # (snapkv+knorm: a rank average)
    ("none+kivi2", "cannot be composed"),
    ("snapkv+", "empty method name"),
    ("snapkv+kivi3", "unknown compressor 'kivi3'"),
])
def test_bad_compositions_fail_at_configuration(bad, message):
    with pytest.raises(ConfigError, match=message):
        make_compressor(bad, ratio=0.5)


def test_composition_settings_are_checked():
    with pytest.raises(ConfigError, match="takes no ratio or budget"):
        make_compressor("kivi2", ratio=0.5)
    with pytest.raises(ConfigError, match="decode phase"):
        make_compressor("h2o+kivi2", ratio=0.5, phase="decode")
    with pytest.raises(ConfigError, match="cannot be given to a composition"):
        make_compressor("snapkv+kivi2", ratio=0.5, window=8)
    pipe = Pipeline(stages=(make_compressor("knorm", budget=10), make_compressor("kivi4", group=32)))
    assert pipe.name == "knorm+kivi4" and pipe.budget == 10 and pipe.quantizes
    assert pipe.keep_for(torch.tensor([50])).tolist() == [10]
    assert make_compressor("kivi2", ratio=0.0).compresses
    with pytest.raises(ConfigError, match="takes only `stages="):
        Pipeline((make_compressor("knorm", budget=10), make_compressor("kivi4")))


def test_cli_accepts_a_composition(capsys):
    import argparse

    from slimkv.cli.common import build_compressor

    args = argparse.Namespace(compressor="snapkv+kivi2", ratio=0.5, budget=None, phase=None)
    comp = build_compressor(args)
    assert comp.describe() == ("snapkv(ratio=0.5, phase=prefill) + kivi2(group=128, residual=0, sinks=4, "
                               "rotate=True, wide_keys=1)")


def test_batch_of_equal_lengths_decodes_like_each_alone(llama):
    a, b = Segments(prompt_ids(40, seed=4), []), Segments(prompt_ids(40, seed=5), [])
    engine = Engine(llama, ToyTokenizer(), make_compressor("kivi2", group=16))
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    alone = [engine.generate(s, config).token_ids for s in (a, b)]
    together = [r.token_ids for r in engine.generate_batch([a, b], config)]
    assert together == alone


def test_prompts_of_different_lengths_decode_together_like_each_alone(llama):
    """Each request holds its own quantized cache: any prompt lengths share a batch."""
    engine = Engine(llama, ToyTokenizer(), make_compressor("kivi2", group=16))
    prompts = [Segments(prompt_ids(40), []), Segments(prompt_ids(45, seed=1), [])]
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    alone = [engine.generate(p, config) for p in prompts]
    together = engine.generate_batch(prompts, config)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.cache.bytes_kept for r in together] == [r.cache.bytes_kept for r in alone]


def test_question_after_quantized_context(llama):
    """Question-agnostic: the context is quantized, the question is appended in full precision."""
    engine = Engine(llama, ToyTokenizer(), make_compressor("kivi2", group=16, sinks=0))
    cache, _ = engine.prepare(Segments(prompt_ids(60, seed=6), prompt_ids(10, seed=7)))
    layer = cache.layers[0]
    assert layer.quantized_length == 60 and layer.residual.max_length == 10
    assert layer.residual.view()[2][0, 0].tolist() == list(range(60, 70))


def test_clone_is_independent(llama):
    engine = Engine(llama, ToyTokenizer(), make_compressor("kivi2", group=16))
    cache, _ = engine.prepare(Segments(prompt_ids(40), []))
    copy = cache.clone()
    assert copy.stats() == cache.stats()
    copy.layers[0].append(*(torch.zeros(1, 2, 1, 16),) * 2, torch.tensor([[40]]))
    assert cache.layers[0].max_length == 40 and copy.layers[0].max_length == 41


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_sliding_window_and_softcap_models_read_quantized_layers(family):
    """Sliding windows and soft-capping take the dequantizing path; 8 bits stays close to the full cache."""
    from .conftest import tiny_model

    model = tiny_model(family, sliding_window=24)
    ids = prompt_ids(100, seed=9)
    full, _ = greedy_logits(Engine(model, ToyTokenizer()), ids, steps=10)
    got, _ = greedy_logits(Engine(model, ToyTokenizer(), make_compressor("kivi8", group=16)), ids, steps=10)
    assert (got - full).abs().max() / full.abs().max() < 0.05


@pytest.mark.parametrize("bits, key_bits", [(2, None), (4, None), (8, None), (2, 4), (4, 8)])
def test_fused_kernel_matches_dequantized_attention(bits, key_bits):
    from slimkv.cache import kernels

    layer = dense_layer(batch=2, heads=2, tokens=150, dim=16)
    q = QuantizedLayer.from_layer(layer, QuantSpec(bits=bits, group=32, residual=3, key_bits=key_bits))
    q.append(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), torch.arange(150, 154).expand(2, 4))
    query = torch.randn(2, 6, 1, 16)
    position = torch.tensor([[154], [154]])
    if not kernels.available(query, q):
        pytest.skip("no C compiler: the kernel is not built")
    fused, _ = q.attend(query, AttentionMeta(position, 1, 0.25))
    with kernels.disabled():
        dense, _ = q.attend(query, AttentionMeta(position, 1, 0.25))
    torch.testing.assert_close(fused, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scorer", ["keydiff", "snapkv"])
def test_minikv_gives_lower_layers_more_entries_at_the_same_total(llama, scorer):
    uniform = Engine(llama, ToyTokenizer(), make_compressor(scorer, ratio=0.5))
    pyramid = Engine(llama, ToyTokenizer(), make_compressor("minikv", ratio=0.5, beta=2, group=16, scorer=scorer))
    ids = prompt_ids(80, seed=8)
    ref, _ = uniform.prepare(Segments(ids, []))
    cache, _ = pyramid.prepare(Segments(ids, []))
    kept = [layer.max_length for layer in cache.layers]
    assert [layer.max_length for layer in ref.layers] == [40, 40]
    assert kept == [60, 20] and sum(kept) == 80  # 1.5x and 0.5x the average, same total
    assert all(isinstance(layer, QuantizedLayer) and layer.spec.bits == 2 for layer in cache.layers)
    # the first layer keeps a superset of what the uniform scorer keeps (same scores, larger budget)
    assert set(ref.layers[0].view()[2][0, 0].tolist()) <= set(cache.layers[0].positions[0, 0].tolist())
    with pytest.raises(ConfigError, match="beta"):
        make_compressor("minikv", ratio=0.5, beta=0.5)
    with pytest.raises(ConfigError, match="scorer must be one of keydiff, snapkv"):
        make_compressor("minikv", ratio=0.5, scorer="h2o")


def test_loading_the_kernel_keeps_denormals():
    """The kernel is compiled with -ffast-math but never linked with it: no process-wide flush-to-zero."""
    from slimkv.cache import kernels

    kernels.compiled()
    assert (torch.tensor([1e-39]) * 1.0).item() > 0
