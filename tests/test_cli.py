"""The CLI contract: exit codes, messages, JSON shapes (tiny cases here; the embedded model in test_embedded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimkv.cli.main import main
from slimkv.compressors import names


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_json_lists_every_compressor(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    data = json.loads(out)
    assert code == 0 and sorted(m["name"] for m in data) == names()
    assert all({"kind", "phases", "paper"} <= set(m) for m in data)


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5", "--prompt", "hi"], "ratio must be in [0, 1)"),
    (["--ratio", "-0.5", "--prompt", "hi"], "ratio must be in [0, 1)"),
    (["--budget", "0", "--prompt", "hi"], "budget must be"),
    (["--compressor", "bogus", "--prompt", "hi"], "valid compressors: "),
    (["--prompt-file", "/no/such/file"], "does not exist"),
    (["--compressor", "h2o", "--ratio", "0.5", "--phase", "decode", "--allocation", "head", "--prompt", "hi"],
     "use phase='prefill'"),
    (["--compressor", "snapkv+kivi2", "--ratio", "0.5", "--allocation", "head", "--prompt", "hi"],
     "cannot be given to a composition"),
    (["--prompt", "   "], "prompt is empty"),
    (["--context", "some text"], "needs --question"),
    (["--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'"),
    (["--model", "./missing/dir", "--prompt", "hi"], "does not exist"),
])
def test_bad_input_exits_2_with_message(capsys, argv, message):
    code, out, err = run(capsys, "generate", *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_argparse_rejects_ratio_and_budget_together(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--ratio", "0.5", "--budget", "3", "--prompt", "x"])
    assert exc.value.code == 2


def test_allocation_flag_reaches_the_compressor():
    import argparse

    from slimkv.cli.common import build_compressor

    args = argparse.Namespace(compressor="knorm", ratio=0.5, budget=None, phase=None, allocation="head")
    assert build_compressor(args).allocation == "head"
    args.allocation = None  # the method's own default
    assert build_compressor(args).allocation == "uniform"
    args.compressor = "adasnapkv"
    assert build_compressor(args).allocation == "head"


def test_calibrate_triattention_records_what_it_used(capsys, monkeypatch, llama, tmp_path):
    import slimkv.models
    from slimkv.compressors import calibration

    from .conftest import ToyTokenizer

    monkeypatch.setattr(slimkv.models, "load_model", lambda name, dtype=None, device="cpu": (llama, ToyTokenizer()))
    monkeypatch.setattr(calibration, "CALIBRATION_DIR", tmp_path)
    code, out, _ = run(capsys, "calibrate", "triattention", "--tokens", "32", "--text", "noise", "--json")
    data = json.loads(out)
    assert code == 0 and data["tokens"] == 32 and data["text"] == "noise"
    manifest = json.loads((tmp_path / f"triattention-{data['fingerprint']}.json").read_text())
    assert manifest["tokens"] == 32 and manifest["text"] == "noise" and len(manifest["sha256"]) == 64
    code, _, err = run(capsys, "calibrate", "triattention", "--tokens", "4")
    assert code == 2 and "at least 16 tokens" in err


def test_calibrate_kivi_records_the_wide_key_layers(capsys, monkeypatch, llama, tmp_path):
    import slimkv.models
    from slimkv.compressors import calibration

    from .conftest import ToyTokenizer

    monkeypatch.setattr(slimkv.models, "load_model", lambda name, dtype=None, device="cpu": (llama, ToyTokenizer()))
    monkeypatch.setattr(calibration, "CALIBRATION_DIR", tmp_path)
    code, out, _ = run(capsys, "calibrate", "kivi", "--tokens", "96", "--json")
    data = json.loads(out)
    assert code == 0 and data["probes"] == 4 and len(data["wide_key_layers"]) == 1
    assert data["wide_key_layers"][0] == data["most_sensitive"][0][0]
    saved = json.loads(Path(data["path"]).read_text())
    assert max(range(len(saved["nll_increase"])), key=saved["nll_increase"].__getitem__) == data["wide_key_layers"][0]
    code, _, err = run(capsys, "calibrate", "kivi", "--tokens", "40")
    assert code == 2 and "context >= 2 x span" in err
