"""``load_model``: the embedded default model, a local Hugging Face folder or GGUF file, or a hub id."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ModelError
from . import embedded
from .adapter import check_supported

log = logging.getLogger(__name__)

DEFAULT_MODEL = embedded.NAME
ALIASES = {embedded.NAME: "embedded", "default": "embedded"}


def _dtype(name: str | None):
    import torch

    table = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ModelError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return table[name]


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | None = None, device: str = "cpu"):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)``.

    name_or_path: ``smollm2-135m`` (the embedded default), a local model folder, a ``.gguf`` file,
                  or a Hugging Face hub id (needs access to the hub)
    dtype: float32 (default), bfloat16 or float16; device: a torch device string
    Raises :class:`ModelError` with what to do when the model cannot be found or run.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)
    target = _device(device)
    path = Path(name_or_path).expanduser()
    try:
        if ALIASES.get(name_or_path) == "embedded":
            folder = embedded.converted_folder()
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        elif path.is_file() and path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"{path} is a folder but has no config.json; point to a Hugging Face model folder")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        elif path.suffix or os.sep in name_or_path and not _looks_like_hub_id(name_or_path):
            raise ModelError(f"model path {name_or_path!r} does not exist")
        else:
            model, tokenizer = _from_hub(name_or_path, torch_dtype)
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load model {name_or_path!r}: {exc}") from exc
    check_supported(model)
    model = model.to(target).eval()
    log.info("loaded %s (%s, %s)", name_or_path, type(model).__name__, torch_dtype)
    return model, tokenizer


def _device(name: str):
    """A torch device that exists on this machine, or a :class:`ModelError` saying which ones do."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device {name!r} asked for, but this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ModelError(f"device {name!r} asked for, but this machine has {count} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ModelError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def _from_hub(name: str, torch_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not _looks_like_hub_id(name):
        raise ModelError(
            f"unknown model {name!r}: not the embedded model ({DEFAULT_MODEL}), not a local folder "
            "or .gguf file, and not a hub id of the form owner/name"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ModelError(
            f"could not load {name!r} from the Hugging Face hub ({exc.__class__.__name__}). Without "
            f"hub access use the embedded model ({DEFAULT_MODEL}) or a local model folder."
        ) from exc
    return model, tokenizer
