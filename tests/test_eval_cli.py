"""`slimkv eval` end to end on a tiny random model saved as a local folder (seconds, no hub)."""

from __future__ import annotations

import json

import pytest

from slimkv.cli.main import main

from .conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    from slimkv.models import embedded

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(embedded.converted_folder())
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=4096)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_suite_end_to_end(tiny_folder, tmp_path, capsys):
    out = tmp_path / "suite"
    code = main(["eval", "suite", "--model", str(tiny_folder), "--compressors", "snapkv,knorm",
                 "--ratios", "0.5,0.75", "--tasks", "needle,vt", "--lengths", "300,600", "--samples", "2",
                 "--settings", "agnostic,aware", "--max-new-tokens", "3", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 * 2 * 5  # tasks x lengths x samples x settings x (4 configs + none)
    board = (out / "leaderboard.md").read_text()
    assert "## needle, question-agnostic" in board and "snapkv@0.75" in board
    assert (out / "heatmap_needle_agnostic.png").exists() and (out / "kv_bytes.png").exists()
    # a second run finds everything done and writes nothing new
    assert main(["eval", "suite", "--model", str(tiny_folder), "--compressors", "snapkv,knorm",
                 "--ratios", "0.5,0.75", "--tasks", "needle,vt", "--lengths", "300,600", "--samples", "2",
                 "--settings", "agnostic,aware", "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)


def test_task_json_and_bad_input(tiny_folder, tmp_path, capsys):
    code = main(["eval", "needle", "--model", str(tiny_folder), "--lengths", "300", "--samples", "2",
                 "--ratio", "0.5", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and set(data) >= {"task", "compressor", "ratio", "score", "full_score", "results"}
    assert data["results"][0]["samples"] == 2
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold a long haystack. " * 5)
    out = tmp_path / "never.jsonl"
    code = main(["eval", "needle", "--model", str(tiny_folder), "--lengths", "2000", "--haystack", str(short),
                 "--out", str(out)])
    assert code == 2 and "short" in capsys.readouterr().err.lower() and not out.exists()
    assert main(["eval", "needle", "--model", str(tiny_folder), "--lengths", "5000"]) == 2
