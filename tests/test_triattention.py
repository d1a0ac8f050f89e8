"""TriAttention: the trigonometric score against explicit RoPE, calibration and its cache, decode windows."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from slimkv.compressors import calibration, make_compressor
from slimkv.compressors.eviction.triattention import distances, expected_logits
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.errors import ConfigError

from .conftest import ToyTokenizer, prompt_ids, tiny_model


def full_prefill(model, ids):
    engine = Engine(model, ToyTokenizer())
    with engine.adapter.attached():
        cache, _ = engine.prepare(Segments(ids, []))
    return engine, cache


def explicit_mean_logit(model, keys, centre, now, ahead):
    """Mean over d of (centre rotated by transformers to position now + d) . (stored key), per query head."""
    q_heads, half = centre.shape
    heads = keys.shape[1]
    query = torch.cat([centre.real, centre.imag], dim=-1).float()[None, :, None, :]  # [1, Hq, 1, D]
    total = 0
    for d in ahead.tolist():
        pos = torch.tensor([[now + int(d)]])
        cos, sin = model.model.rotary_emb(query, pos)
        rotated, _ = apply_rotary_pos_emb(query, query, cos, sin)  # [1, Hq, 1, D]
        k = keys.repeat_interleave(q_heads // heads, dim=1)  # [1, Hq, L, D]
        total = total + (rotated @ k.transpose(-1, -2))[:, :, 0]  # [1, Hq, L]
    return total / len(ahead)


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 128}])
def test_score_is_the_mean_rotated_centre_dot_product(rope):
    model = tiny_model("llama", **({"rope_parameters": rope} if rope else {}))
    engine, cache = full_prefill(model, prompt_ids(48, seed=8))
    spec_rope = engine.adapter.rope(1)
    if rope:
        assert spec_rope.scaling != 1.0  # YaRN scales cos and sin: the test covers the factor
    keys, _, positions = cache.layers[1].view()
    g = torch.Generator().manual_seed(3)
    centre = torch.complex(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g))
    ahead = distances(256)
    got = expected_logits(keys, centre, centre.abs(), spec_rope.inv_freq, spec_rope.scaling,
                          torch.tensor([47]), ahead)  # abs_mean = |centre|: no norm term
    want = explicit_mean_logit(model, keys, centre, 47, ahead)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the norm term: (E|q_f| - |c_f|) * |k_f| summed over pairs, times the RoPE scaling
    spread = torch.rand(4, 8, generator=g)
    extra = expected_logits(keys, centre, centre.abs() + spread, spec_rope.inv_freq, spec_rope.scaling,
                            torch.tensor([47]), ahead) - got
    modulus = torch.hypot(keys[..., :8], keys[..., 8:]).repeat_interleave(2, dim=1)  # [1, Hq, L, 8]
    torch.testing.assert_close(extra, spec_rope.scaling * (modulus * spread[None, :, None]).sum(-1),
                               rtol=1e-4, atol=1e-4)


def test_calibration_recovers_pre_rope_queries(llama):
    """Centres equal the mean of q_proj's output (before RoPE), caught with a forward hook."""
    engine = Engine(llama, ToyTokenizer())
    captured = []
    hook = llama.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        centres = calibration.measure(engine.runner, tokens=64, text="bible")
    finally:
        hook.remove()
    pre = torch.cat(captured, dim=1).view(1, -1, 4, 16)[0]  # [T, Hq, D]
    want = torch.complex(pre[..., :8], pre[..., 8:])
    torch.testing.assert_close(centres.mean[1], want.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(centres.abs_mean[1], want.abs().mean(0), rtol=1e-4, atol=1e-5)
    assert centres.tokens == 64 and centres.text == "bible"


def test_centres_are_cached_and_a_corrupt_file_is_rebuilt(llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(calibration, "CALIBRATION_DIR", tmp_path)
    monkeypatch.setattr(calibration, "DEFAULT_TOKENS", 96)
    calls = []
    measure = calibration.measure
    monkeypatch.setattr(calibration, "measure", lambda engine: calls.append(1) or measure(engine, tokens=96))
    engine = Engine(llama, ToyTokenizer())
    with caplog.at_level(logging.INFO, logger="slimkv.compressors.calibration"):
        first = calibration.ensure_centres(engine.runner)
    assert len(calls) == 1 and "measuring" in caplog.text
    path = calibration.centres_path(engine.adapter.fingerprint())
    assert path.is_file() and path.with_suffix(".json").is_file()
    second = calibration.ensure_centres(engine.runner)
    assert len(calls) == 1  # loaded, not measured again
    torch.testing.assert_close(second.mean, first.mean)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        third = calibration.ensure_centres(engine.runner)
    assert len(calls) == 2 and "checksum" in caplog.text
    torch.testing.assert_close(third.mean, first.mean)
    rebuilt = calibration.load_centres(engine.adapter.fingerprint(), 2, 4, 8)
    assert rebuilt is not None  # the rebuilt file verifies


def test_first_use_measures_then_reuses(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "CALIBRATION_DIR", tmp_path)
    monkeypatch.setattr(calibration, "DEFAULT_TOKENS", 64)
    comp = make_compressor("triattention", budget=16, phase="decode")
    engine = Engine(llama, ToyTokenizer(), comp)
    assert not list(tmp_path.glob("triattention-*.pt"))  # building an engine calibrates nothing
    bound = engine.bind(comp)
    assert len(list(tmp_path.glob("triattention-*.pt"))) == 1
    assert bound.centre.shape == (2, 4, 8)
    assert engine.bind(comp) is bound  # once per model: the engine keeps it, the compressor stays config
    assert not [f for f in vars(comp) if f.startswith("_bound")]


def test_unbound_score_says_what_to_do(llama):
    comp = make_compressor("triattention", ratio=0.5)
    _, cache = full_prefill(llama, prompt_ids(20))
    from slimkv.compressors import ScoreContext

    ctx = ScoreContext(0, 2, torch.tensor([10]), torch.tensor([20]), "prefill")
    with pytest.raises(ConfigError, match="Engine"):
        comp.score(cache.layers[0], ctx)


@pytest.mark.parametrize("bad", [dict(recent=1.5), dict(max_distance=0)])
def test_bad_settings_fail_at_configuration(bad):
    with pytest.raises(ConfigError, match="triattention"):
        make_compressor("triattention", ratio=0.5, **bad)


def test_decode_keeps_the_window_and_evicts_the_lowest_expected_logit(llama):
    comp = make_compressor("triattention", budget=20, phase="decode", recent=0.3)
    engine = Engine(llama, ToyTokenizer(), comp)
    victims = []
    original = comp.make_room

    def spy(layer, ctx, cap):
        room = original(layer, ctx, cap)
        if room is not None:
            scores = comp.score(layer, ctx)
            _, _, positions = layer.view()
            victims.append((scores.gather(-1, room.slots[..., None]), scores.min(-1).values,
                            positions.gather(-1, room.slots[..., None]), int(ctx.seen[0])))
        return room

    comp.make_room = spy
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    result = engine.generate(Segments(prompt_ids(12), []), config)
    assert result.cache.tokens_kept == 20 and victims
    for victim_score, lowest, victim_pos, seen in victims:
        assert torch.equal(victim_score[..., 0], lowest)  # the lowest expected logit goes
        assert bool((victim_pos < seen - 6).all())  # never one of the 6 most recent tokens (0.3 of 20)
