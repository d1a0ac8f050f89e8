"""CommVQ: code packing, the RoPE-commutativity of the codebooks, attention from codes, exact bytes,
the per-model calibration cache (reuse, corruption), composition with eviction."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import KVLayer
from slimkv.cache.attention import AttentionMeta, attend_rows
from slimkv.cache.vq import VQLayer
from slimkv.cache.vq_codes import (
    HALF,
    code_logits,
    decode,
    encode,
    fit_codebooks,
    pack_codes,
    rope,
    rotate_half,
    unpack_codes,
)
from slimkv.compressors import make_compressor
from slimkv.compressors.quantization import commvq_calibration as cal
from slimkv.compressors.quantization.commvq import stages_for
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.errors import ConfigError
from slimkv.models import ModelAdapter

from .conftest import ToyTokenizer, prompt_ids, tiny_model

HEAD_DIM = 32  # 2 bits x 32 channels = 64 bits: a float16 norm and 6 one-byte stages


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", head_dim=HEAD_DIM)


def engine(model, name="commvq2", **kw):
    """An engine with a bound CommVQ compressor (its codebooks fitted or loaded now)."""
    eng = Engine(model, ToyTokenizer(), make_compressor(name, tokens=256, **kw))
    eng.bind(eng.compressor)
    return eng


def books(stages=3, dim=HEAD_DIM, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, 512, dim, generator=g) * torch.linspace(0.3, 2.0, dim)
    alpha, beta, err = fit_codebooks(x, stages, iters=4)
    return x, alpha, beta, err


# ---------------------------------------------------------------------- codes
def test_codes_pack_and_unpack_exactly():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, HALF, (2, 50, 7), generator=g), torch.randint(0, HALF, (2, 50, 7), generator=g)
    packed = pack_codes(a, b)
    assert packed.dtype == torch.uint8 and packed.shape == a.shape
    ua, ub = unpack_codes(packed)
    assert torch.equal(ua, a) and torch.equal(ub, b)
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_codes(*unpack_codes(every)), every)


def test_decode_is_the_sum_of_the_coded_codewords_and_fit_error_falls():
    x, alpha, beta, err = books(stages=4)
    codes, norms = encode(x, alpha, beta)
    a, b = unpack_codes(codes)
    manual = sum(alpha[0, s, a[0, :, s]] + rotate_half(beta[0, s, b[0, :, s]]) for s in range(4))
    torch.testing.assert_close(decode(codes, norms, alpha, beta)[0], manual * norms[0].float()[:, None])
    assert bool((err[:, 1:] <= err[:, :-1] + 1e-6).all())  # every stage lowers the residual error
    xh = decode(codes, norms, alpha, beta)
    assert float(((x - xh) ** 2).sum() / (x ** 2).sum()) < float(err[:, 0].max())


# ---------------------------------------------------------------------- RoPE commutativity
def test_rope_frequencies_and_rotation_match_the_model(model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inv_freq = ModelAdapter(model).rope_table()
    assert inv_freq.shape == (2, HEAD_DIM // 2)
    torch.testing.assert_close(inv_freq[0], model.model.rotary_emb.inv_freq.float())
    x = torch.randn(1, 2, 9, HEAD_DIM)
    pos = torch.arange(100, 109)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rope(x, pos[0], inv_freq[0]), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope(ref, pos[0], -inv_freq[0]), x, rtol=1e-5, atol=1e-5)


def test_codewords_commute_with_rope():
    """Every codeword acts pair by pair as a complex number [[a, -b], [b, a]]; such matrices commute
    with RoPE's rotations, so rotating a coded key equals applying its codewords to a rotated unit
    vector: RoPE_m(c) == c * RoPE_m(1) per pair, and the j of a code's second half (rotate_half) is
    itself a RoPE-style rotation of the same pairs."""
    _, alpha, beta, _ = books(stages=2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    pos = torch.tensor([0, 1, 7, 300, 4095])
    words = torch.cat([alpha.flatten(0, 2), rotate_half(beta.flatten(0, 2))])  # [W, D]

    def as_complex(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.complex(x1, x2)

    unit = torch.zeros(len(pos), HEAD_DIM)
    unit[:, : HEAD_DIM // 2] = 1.0
    rotated_words = rope(words[:, None].expand(-1, len(pos), -1), pos, inv_freq)  # R_m c
    words_on_rotated = as_complex(words)[:, None] * as_complex(rope(unit, pos, inv_freq))[None]  # c R_m 1
    torch.testing.assert_close(as_complex(rotated_words), words_on_rotated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope(rotate_half(words[:, None].expand(-1, len(pos), -1)), pos, inv_freq),
                               rotate_half(rotated_words), rtol=1e-5, atol=1e-5)


def test_logits_from_codes_equal_logits_on_rotated_decoded_keys():
    x, alpha, beta, _ = books(stages=3)
    codes, norms = encode(x[:, :40], alpha, beta)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    pos = torch.randint(0, 5000, (40,), generator=torch.Generator().manual_seed(3))
    q = torch.randn(2, 5, HEAD_DIM)
    keys = rope(decode(codes, norms, alpha, beta), pos, inv_freq)  # [G, N, D]
    torch.testing.assert_close(code_logits(q, codes, norms, pos, alpha, beta, inv_freq),
                               q @ keys.transpose(1, 2), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- the layer
def coded_layer(model, tokens=70, window=0):
    eng = engine(model, window=window)
    layer = KVLayer()
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(1, 2, tokens, HEAD_DIM, generator=g), torch.randn(1, 2, tokens, HEAD_DIM, generator=g)
    layer.append(keys, values, torch.arange(tokens)[None], exact=True)
    return eng.compressor.quantize(layer, 0, eng.bind(eng.compressor)), keys, values


@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_from_codes_equals_attention_on_decoded_entries(model, window):
    layer, _, _ = coded_layer(model, window=window)
    layer.append(torch.randn(1, 2, 1, HEAD_DIM), torch.randn(1, 2, 1, HEAD_DIM), torch.tensor([[70]]))
    assert layer.quantized_length == 70 - window and layer.residual.max_length == window + 1
    query = torch.randn(1, 4, 1, HEAD_DIM)
    got, _ = layer.attend(query, AttentionMeta(torch.tensor([[70]]), 1, 0.2))
    keys, values, positions = layer.view()
    ref, _ = attend_rows(query, keys, values, positions, AttentionMeta(torch.tensor([[70]]), 1, 0.2))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_layer_bytes_and_decode_time_coding(model):
    layer, keys, _ = coded_layer(model)
    stages = stages_for(2, HEAD_DIM)
    assert stages == 6 and layer.k_codes.shape == (1, 2, 70, stages)
    # codes + float16 norms for keys and values, int16 positions shared by the heads, int64 lengths
    assert layer.nbytes() == 2 * 2 * 70 * (stages + 2) + 70 * 2 + 2 * 8
    assert (stages + 2) * 8 / HEAD_DIM == 2.0  # bits per element of codes plus norm
    for t in range(70, 70 + 32 + 16 + 1):  # group 32 waits in full precision, plus the rollback slack
        layer.append(torch.randn(1, 2, 1, HEAD_DIM), torch.randn(1, 2, 1, HEAD_DIM), torch.tensor([[t]]))
    assert layer.quantized_length == 70 + 32 and layer.residual.max_length == 17
    assert layer.positions[0, 0].tolist() == list(range(70 + 49))
    layer.truncate(layer.lengths - 3)
    assert layer.max_length == 116


def test_quantizer_settings_are_checked_at_configuration_time():
    with pytest.raises(ConfigError, match="no ratio or budget"):
        make_compressor("commvq2", ratio=0.5)
    with pytest.raises(ConfigError, match="group"):
        make_compressor("commvq1", group=0)
    with pytest.raises(ConfigError, match="calibration"):
        make_compressor("commvq2", tokens=10)
    assert stages_for(2, 64) == 14 and stages_for(1, 64) == 6  # the embedded model: 2.0 and 1.0 bits


# ---------------------------------------------------------------------- engine, calibration cache
def test_prefill_codes_every_entry_in_two_bits(model):
    eng = engine(model)
    cache, _ = eng.prepare(Segments(prompt_ids(256), []))
    spec = eng.adapter.spec
    stats = cache.stats()
    assert all(isinstance(layer, VQLayer) for layer in cache.layers) and stats.tokens_kept == 256
    elements = 256 * spec.layers * spec.kv_heads * 2 * spec.head_dim
    assert stats.bytes_kept * 8 == elements * 2 + spec.layers * (256 * 16 + spec.kv_heads * 64)


def test_calibration_is_cached_reused_and_rebuilt_when_corrupt(model, tmp_path, monkeypatch):
    calls = []
    real_fit = cal.fit

    def counting_fit(*args, **kwargs):
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(cal, "fit", counting_fit)
    first = engine(model, cache_dir=str(tmp_path))
    files = sorted(tmp_path.glob("*.pt"))
    assert len(calls) == 1 and len(files) == 1 and files[0].with_suffix(".sha256").is_file()
    assert first.adapter.fingerprint() in files[0].name and "s6-t256" in files[0].name
    engine(model, cache_dir=str(tmp_path))  # a new compressor on the same model: the file is reused
    assert len(calls) == 1
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    again = engine(model, cache_dir=str(tmp_path))
    assert len(calls) == 2 and cal.load(files[0]) is not None  # refitted and rewritten
    for a, b in zip(first.bind(first.compressor), again.bind(again.compressor)):
        assert torch.equal(a.k_alpha, b.k_alpha)  # a deterministic fit
    engine(model, "commvq1", cache_dir=str(tmp_path))  # other settings: their own file
    assert len(calls) == 3 and len(list(tmp_path.glob("*.pt"))) == 2


def test_compress_without_a_bound_model_is_a_clear_error(model):
    from slimkv.compressors.base import ScoreContext

    layer = KVLayer()
    layer.append(torch.randn(1, 2, 4, HEAD_DIM), torch.randn(1, 2, 4, HEAD_DIM), torch.arange(4)[None])
    ctx = ScoreContext(0, 2, torch.tensor([4]), torch.tensor([4]), "prefill")
    with pytest.raises(ConfigError, match="codebooks"):
        make_compressor("commvq2").compress(layer, ctx)


def test_snapkv_then_commvq2(model):
    eng = engine(model)
    comp = make_compressor("snapkv+commvq2", ratio=0.5)
    runner = eng.with_compressor(comp)
    result = runner.generate(Segments(prompt_ids(120), []), GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert len(result.token_ids) == 6
    after = result.cache_after_prefill
    assert after.tokens_kept == 60
    spec = eng.adapter.spec
    assert after.bytes_kept == spec.layers * (spec.kv_heads * 60 * 2 * 8 + spec.kv_heads * 60 * 2 + spec.kv_heads * 8)
