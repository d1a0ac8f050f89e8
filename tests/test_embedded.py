"""Behaviour on the embedded SmolLM2-135M (a trained model): needle retrieval and the CLI end to end.

Kept few and small so CI stays fast: the model is converted once per machine and loaded once here.
"""

from __future__ import annotations

import json

import pytest

import slimkv
from slimkv.cli.main import main
from slimkv.engine import Engine, GenerationConfig, Request
from slimkv.evals.needle import needle_sample

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm():
    return slimkv.load_model()


@pytest.fixture(scope="module")
def needle(smollm):
    return needle_sample(smollm[1], 1000, depth=0.5, seed=11)


def test_needle_full_cache(smollm, needle):
    engine = Engine(*smollm)
    result = engine.generate(Request(needle.context, needle.question), GenerationConfig(max_new_tokens=8))
    assert needle.answer in result.text
    assert 950 <= result.prompt_tokens <= 1050


def test_needle_snapkv_half_question_aware(smollm, needle):
    engine = Engine(*smollm, compressor=slimkv.make_compressor("snapkv", ratio=0.5))
    result = engine.generate(Request(needle.context + needle.question), GenerationConfig(max_new_tokens=8))
    assert needle.answer in result.text
    after = result.cache_after_prefill
    assert after.tokens_kept == int(after.tokens_full * 0.5)
    assert after.bytes_kept < 0.52 * after.bytes_full  # real bytes, positions included


def test_cli_generate_json(capsys, tmp_path, needle):
    context = tmp_path / "doc.txt"
    context.write_text(needle.context)
    code = main(["generate", "--context-file", str(context), "--question", needle.question.strip(),
                 "--compressor", "knorm", "--ratio", "0.5", "--max-new-tokens", "6", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out) >= {"text", "tokens", "kv", "timing"}
    assert set(out["tokens"]) == {"prompt", "generated"}
    assert set(out["kv"]) == {"tokens_full", "tokens_kept", "bytes_full", "bytes_kept"}
    assert set(out["timing"]) == {"prefill_s", "ttft_s", "decode_tokens_per_s"}
    assert out["kv"]["bytes_kept"] < out["kv"]["bytes_full"]


def test_cli_prompt_longer_than_context(capsys, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("word " * 9000)
    code = main(["generate", "--prompt-file", str(long)])
    err = capsys.readouterr().err
    assert code == 2 and "model's context is 8192 tokens" in err
