"""Engine behaviour on a tiny model: sampling, stop strings, EOS, streaming, errors."""

from __future__ import annotations

import pytest
import torch

from slimkv.engine import Engine, GenerationConfig, Request, SamplingConfig, Segments
from slimkv.engine.sampling import Sampler
from slimkv.errors import ConfigError, InputError

from .conftest import ToyTokenizer, prompt_ids


def test_seeded_sampling_is_deterministic(llama):
    engine = Engine(llama, ToyTokenizer())
    cfg = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=1.0, seed=5), ignore_eos=True)
    a = engine.generate(Segments(prompt_ids(20), []), cfg).token_ids
    b = engine.generate(Segments(prompt_ids(20), []), cfg).token_ids
    other = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=1.0, seed=6), ignore_eos=True)
    c = engine.generate(Segments(prompt_ids(20), []), other).token_ids
    assert a == b and a != c


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = Sampler(SamplingConfig(temperature=1.0, top_k=2)).probabilities(logits)
    assert (probs[0, 2:] == 0).all() and probs[0, :2].sum() == pytest.approx(1.0)
    # p(0)=0.64, p(1)=0.24: top_p 0.7 keeps the first two (the token crossing p stays)
    probs = Sampler(SamplingConfig(temperature=1.0, top_p=0.7)).probabilities(logits)
    assert (probs[0, 2:] == 0).all() and (probs[0, :2] > 0).all()
    assert Sampler(SamplingConfig()).__call__(logits).item() == 0


def test_stop_string_cuts_text(llama):
    engine = Engine(llama, ToyTokenizer())
    full = engine.generate(Segments(prompt_ids(20), []), GenerationConfig(max_new_tokens=20, ignore_eos=True))
    stop = full.text[5:7]
    cut = engine.generate(Segments(prompt_ids(20), []),
                          GenerationConfig(max_new_tokens=20, stop=(stop,), ignore_eos=True))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_eos_ends_generation(llama):
    engine = Engine(llama, ToyTokenizer())
    first = engine.generate(Segments(prompt_ids(20), []), GenerationConfig(max_new_tokens=3)).token_ids[0]
    engine.end_ids = {first}
    result = engine.generate(Segments(prompt_ids(20), []), GenerationConfig(max_new_tokens=3))
    assert result.finish_reason == "eos" and result.token_ids == []


def test_stream_pieces_add_up_to_text(llama):
    engine = Engine(llama, ToyTokenizer())
    gen = engine.stream(Segments(prompt_ids(20), []), GenerationConfig(max_new_tokens=15, ignore_eos=True))
    pieces = [p.text for p in gen]
    assert len(pieces) > 1 and "".join(pieces) == gen.results[0].text


def test_bad_inputs_are_clear(llama):
    engine = Engine(llama, ToyTokenizer())
    with pytest.raises(InputError, match="empty"):
        engine.generate(Request(context="   "))
    with pytest.raises(InputError, match="context is 512 tokens"):
        engine.generate(Segments(prompt_ids(600), []))
    with pytest.raises(InputError, match="chat template"):
        engine.generate(Request(context="hi", chat=True))
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError):
        GenerationConfig(max_new_tokens=-1)


def test_generation_stops_at_the_context_length(llama):
    engine = Engine(llama, ToyTokenizer())
    result = engine.generate(Segments(prompt_ids(505), []), GenerationConfig(max_new_tokens=50, ignore_eos=True))
    assert len(result.token_ids) == 7 and result.finish_reason == "length"
