"""Model families run through capability checks, not a class list: ratio 0 equals plain transformers."""

from __future__ import annotations

import pytest
import torch

from slimkv.engine import Engine
from slimkv.errors import ModelError
from slimkv.models import check_supported

from .conftest import ToyTokenizer, prompt_ids, tiny_model
from .test_compressor_matrix import hf_greedy_logits, slimkv_greedy_logits

FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 16},  # the window bites: prompt is longer than it
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 16, "attn_logit_softcapping": 50.0},
    "gemma3": {"sliding_window": 16},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family):
    model = tiny_model(family, **FAMILIES[family])
    ids = prompt_ids(40, seed=8)
    with torch.no_grad():
        ref = hf_greedy_logits(model, ids, steps=6)
    got = slimkv_greedy_logits(Engine(model, ToyTokenizer(), prefill_chunk=16), ids, steps=6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_unsupported_model_is_refused():
    class NotAnLM(torch.nn.Module):
        config = type("Cfg", (), {"num_attention_heads": 2})()

    with pytest.raises(ModelError, match="AttentionInterface"):
        check_supported(NotAnLM())


def test_model_keeps_working_outside_slimkv():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    Engine(model, ToyTokenizer()).generate(
        __import__("slimkv").engine.Segments(prompt_ids(10), []),
    )
    assert model.config._attn_implementation == before
