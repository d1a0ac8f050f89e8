"""The embedded model's converted copy is trusted only when its checksums match (no model needed)."""

from __future__ import annotations

import json

from slimkv.models import embedded


def test_verify_detects_corruption(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights" * 100)
    files = {"model.safetensors": embedded.sha256(tmp_path / "model.safetensors")}
    (tmp_path / embedded.MANIFEST).write_text(json.dumps({"format": embedded.FORMAT, "files": files}))
    assert embedded.verify(tmp_path)
    with (tmp_path / "model.safetensors").open("r+b") as f:
        f.seek(10)
        f.write(b"X")
    assert not embedded.verify(tmp_path)


def test_verify_rejects_missing_or_old_manifest(tmp_path):
    assert not embedded.verify(tmp_path)
    (tmp_path / embedded.MANIFEST).write_text(json.dumps({"format": embedded.FORMAT - 1, "files": {"a": "b"}}))
    assert not embedded.verify(tmp_path)
