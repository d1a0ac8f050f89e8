"""Maintained benchmarks still run (at a toy size): a benchmark nobody runs rots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.model
def test_throughput_benchmark_runs_and_records(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import throughput
    finally:
        sys.path.remove(str(BENCHMARKS))
    md = throughput.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert set(data["runs"]) == {"none", "snapkv@0.75"}
    for run in data["runs"].values():
        assert run["generated_tokens"] == 4 * 6 and run["peak_kv_bytes"] <= run["kv_budget"]
    assert data["runs"]["snapkv@0.75"]["mean_kv_bytes_per_request"] < data["runs"]["none"]["mean_kv_bytes_per_request"]
    assert data["meta"]["command"] and data["meta"]["dtype"] == "float32"
    assert "Batch decoding" in md.read_text()
