"""Lossless decoding on the embedded SmolLM2-135M: greedy output equals plain full-cache decoding.

Every registered compressor at ratio 0.875 (quantizers, which remove nothing, at their defaults) drafts with its compressed cache (VeriCache self-drafting);
the emitted tokens must equal, token for token, those of ``--compressor none`` decoding, on five
prompts and 128 generated tokens each. One plain full-cache reference per prompt serves every
compressor.
"""

from __future__ import annotations

import pytest

import slimkv
from slimkv.compressors import names
from slimkv.engine import Engine, GenerationConfig, LosslessConfig, Request

pytestmark = pytest.mark.model

NEW_TOKENS = 128

PROMPTS = [
    "def merge_sort(items):\n    \"\"\"Sort a list with merge sort.\"\"\"\n    if len(items) <= 1:\n"
    "        return items\n    middle = len(items) // 2\n    left = merge_sort(items[:middle])\n"
    "    right = merge_sort(items[middle:])\n    return merge(left, right)\n\n\ndef merge(left, right):\n",
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and "
    "France built wooden machines that riders pushed along with their feet. Over the following decades "
    "pedals, chains and pneumatic tyres turned the toy into a practical vehicle. Today",
    "Shopping list for the week:\n1. Apples\n2. Bread\n3. Milk\n4. Eggs\n5. Rice\n6. Tomatoes\n"
    "7. Cheese\n8. Coffee\nNotes: buy the apples at the market, the rest at the shop. Recipes planned:\n",
    "Question: A train leaves the station at 9:00 and travels at 80 km/h. A second train leaves the "
    "same station at 10:00 on the same track at 120 km/h. When does the second train catch up with the "
    "first one? Explain step by step.\nAnswer:",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who "
    "had never left his workshop. Every morning he opened the shutters, wound the clocks on the walls "
    "and listened to them ticking together. One winter morning, one of the clocks stopped, and",
]


@pytest.fixture(scope="module")
def smollm():
    return slimkv.load_model()


@pytest.fixture(scope="module")
def references(smollm, request):
    """Plain full-cache greedy decoding (``--compressor none``) of every prompt."""
    if not request.config.getoption("--lossless-matrix"):
        pytest.skip("the full embedded matrix runs with --lossless-matrix")
    engine = Engine(*smollm)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [engine.generate(Request(p), config).token_ids for p in PROMPTS]


@pytest.mark.parametrize("name", names())
def test_greedy_lossless_equals_full_cache(smollm, references, name):
    info = slimkv.compressors.method_info(name)
    engine = Engine(*smollm, compressor=slimkv.make_compressor(name, ratio=None if info.kind == "quantization" else 0.875))
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, lossless=LosslessConfig(drafter="self"))
    for prompt, reference in zip(PROMPTS, references):
        result = engine.generate(Request(prompt), config)
        assert len(reference) == NEW_TOKENS
        assert result.token_ids == reference, f"{name} diverged on prompt {prompt[:30]!r}"
        spec = result.spec
        assert spec is not None and spec.verify_passes >= 1
        assert spec.accepted + spec.verify_passes == NEW_TOKENS - 1  # the first token comes from the prefill
        if name != "none":
            # the fast tier holds the compressed view only; the full view is counted apart
            assert result.cache.bytes_kept < spec.full_view_bytes


def test_snapkv_self_and_auto_drafting_on_one_prompt(smollm):
    reference = Engine(*smollm).generate(Request(PROMPTS[0]), GenerationConfig(max_new_tokens=48, ignore_eos=True))
    engine = Engine(*smollm, compressor=slimkv.make_compressor("snapkv", ratio=0.875))
    for drafter in ("self", "auto"):
        config = GenerationConfig(max_new_tokens=48, ignore_eos=True, lossless=LosslessConfig(drafter=drafter))
        result = engine.generate(Request(PROMPTS[0]), config)
        assert result.token_ids == reference.token_ids
        assert result.spec.drafted > 0


def test_cli_lossless_json_and_datastore(capsys, tmp_path):
    import json

    from slimkv.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PROMPTS[2] * 3)
    store = tmp_path / "shop.skv"
    assert main(["datastore", "build", str(corpus), "--out", str(store), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["tokens"] > 100 and store.is_file()
    args = ["generate", "--prompt", PROMPTS[2], "--compressor", "snapkv", "--ratio", "0.875",
            "--max-new-tokens", "12", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "spec" not in plain
    for drafter in ("self", f"rest:{store}"):
        assert main(args + ["--lossless", "--drafter", drafter]) == 0
        out = json.loads(capsys.readouterr().out)
        full = main(["generate", "--prompt", PROMPTS[2], "--max-new-tokens", "12", "--json"]) if drafter == "self" else 0
        if drafter == "self":
            ref = json.loads(capsys.readouterr().out)
            assert full == 0 and out["text"] == ref["text"]
        spec = out["spec"]
        assert set(spec) >= {"drafted", "accepted", "verify_passes", "mean_accepted_per_pass"}
        assert spec["full_view"]["location"] == "memory"
        assert out["kv"]["bytes_kept"] < spec["full_view"]["bytes"]
    assert main(args + ["--drafter", "prompt"]) == 2
    assert "--lossless" in capsys.readouterr().err
