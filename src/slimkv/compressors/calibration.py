"""Per-model query centres: the mean pre-RoPE query of every layer and query head, measured on real text.

TriAttention (``eviction/triattention.py``) predicts future attention from where a head's queries sit
*before* RoPE turns them. This module measures that once per model and caches it on disk:

1. :func:`measure` runs the model over ``tokens`` tokens of real text (by default the King James
   Bible haystack of ``evals/haystacks.py``), undoes RoPE on every query at its position with the
   frequencies the adapter reads from the model, and averages per layer, query head and rotary pair:
   the complex mean ``E[q_f]`` and the mean modulus ``E[|q_f|]``.
2. :func:`save_centres` writes them under the user cache directory, keyed by the model's fingerprint
   (``ModelAdapter.fingerprint``), with a JSON manifest recording the text, the token count and a
   SHA-256 checksum of the tensor file.
3. :func:`ensure_centres` (what ``TriAttention.bind`` calls) loads verified centres, and measures
   them first - logging that it does - when none are cached or the cached file fails its checksum.

``slimkv calibrate triattention`` runs step 1-2 with chosen text and token count.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from ..models.embedded import cache_root, sha256
from .base import ModelAccess

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is measured changes, so old files are measured again
DEFAULT_TOKENS = 2048
DEFAULT_TEXT = "bible"

#: where centres are cached; None: ``<slimkv cache>/calibration`` (tests point it at a temporary folder)
CALIBRATION_DIR: Path | None = None


@dataclass(frozen=True)
class QueryCentres:
    """Mean pre-RoPE queries of one model.

    mean:     [layers, q_heads, head_dim // 2] complex64, ``E[q_f]`` of rotary pair f (dims f, f + D/2)
    abs_mean: [layers, q_heads, head_dim // 2] float32, ``E[|q_f|]``
    model:    fingerprint of the model they were measured on
    text:     the text they were measured on (a haystack name or a file path); tokens: how many tokens
    """

    mean: Tensor
    abs_mean: Tensor
    model: str
    text: str
    tokens: int


def calibration_dir() -> Path:
    return CALIBRATION_DIR if CALIBRATION_DIR is not None else cache_root() / "calibration"


def centres_path(fingerprint: str) -> Path:
    return calibration_dir() / f"triattention-{fingerprint}.pt"


def write_atomically(path: Path, write: Callable[[str], None]) -> str:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename
    (concurrent readers never see half a file); returns its SHA-256. Shared by every calibration cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        digest = sha256(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def unrotate(query: Tensor, positions: Tensor, inv_freq: Tensor, scaling: float) -> Tensor:
    """Pre-RoPE queries as complex pairs.

    query: [B, Hq, T, D] post-RoPE (rotate-half layout); positions: [B, T]; inv_freq: [D/2]
    Returns [B, Hq, T, D/2] complex64: ``q_rot * exp(-i * inv_freq * position) / scaling``.
    """
    half = query.shape[-1] // 2
    rotated = torch.complex(query[..., :half].float(), query[..., half:].float())
    angle = positions.double()[:, None, :, None] * inv_freq.double().to(query.device)  # [B, 1, T, D/2]
    turn = torch.polar(torch.ones_like(angle), -angle).to(torch.complex64)
    return rotated * turn / scaling


class _QueryRecorder:
    """Sums every layer's pre-RoPE queries (a ``QueryWatcher``): mean and mean modulus per query head."""

    def __init__(self, ropes, mean: Tensor, abs_mean: Tensor) -> None:
        self.ropes, self.mean, self.abs_mean = ropes, mean, abs_mean

    def __call__(self, layer_idx: int, query: Tensor, positions: Tensor) -> None:
        rope = self.ropes[layer_idx]
        pre = unrotate(query, positions, rope.inv_freq, rope.scaling)  # [1, Hq, T, F]
        self.mean[layer_idx] += pre.sum(dim=(0, 2)).cpu()
        self.abs_mean[layer_idx] += pre.abs().sum(dim=(0, 2)).cpu()


def calibration_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of a haystack name or text file (``evals/haystacks.py``)."""
    from ..evals.haystacks import load_haystack

    if tokens < 16:
        raise InputError(f"calibration needs at least 16 tokens, got {tokens}")
    body = load_haystack(text)
    if len(body) < tokens * 8:  # `noise` is one repetition: repeat it, as the task generators do
        body = body * (tokens * 8 // max(len(body), 1) + 1)
    ids = tokenizer.encode(body[: tokens * 8], add_special_tokens=False)[:tokens]
    if len(ids) < 16:
        raise InputError(f"calibration text {text!r} holds only {len(ids)} tokens; give a longer text")
    return ids


@torch.inference_mode()
def measure(model: ModelAccess, tokens: int = DEFAULT_TOKENS, text: str = DEFAULT_TEXT) -> QueryCentres:
    """Query centres of ``model`` over ``tokens`` tokens of ``text`` (full cache, no compression)."""
    adapter = model.adapter
    spec = adapter.spec
    ropes = [adapter.rope(i) for i in range(spec.layers)]
    ids = calibration_ids(model.tokenizer, text, min(tokens, adapter.max_positions - 1))
    half = spec.head_dim // 2
    mean = torch.zeros(spec.layers, adapter.q_heads, half, dtype=torch.complex64)
    abs_mean = torch.zeros(spec.layers, adapter.q_heads, half)
    cache = model.new_cache()
    recorder = _QueryRecorder(ropes, mean, abs_mean)
    cache.reserve(len(ids))
    for start in range(0, len(ids), model.prefill_chunk):
        model.extend(cache, ids[start : start + model.prefill_chunk], watch=recorder)
    return QueryCentres(mean / len(ids), abs_mean / len(ids), adapter.fingerprint(), str(text), len(ids))


def save_centres(centres: QueryCentres) -> Path:
    """Write centres and their manifest atomically; returns the tensor file's path."""
    path = centres_path(centres.model)
    tensors = {"mean_real": centres.mean.real.contiguous(), "mean_imag": centres.mean.imag.contiguous(),
               "abs_mean": centres.abs_mean}
    digest = write_atomically(path, lambda tmp: torch.save(tensors, tmp))
    manifest = {"format": FORMAT, "model": centres.model, "text": centres.text, "tokens": centres.tokens,
                "sha256": digest}
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=1))
    return path


def load_centres(fingerprint: str, layers: int, q_heads: int, half: int) -> QueryCentres | None:
    """Verified cached centres of a model, or None (nothing cached, or a file fails its checks)."""
    path = centres_path(fingerprint)
    try:
        manifest = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("model") != fingerprint:
        return None
    if not path.is_file() or sha256(path) != manifest.get("sha256"):
        log.warning("cached query centres %s fail their checksum; measuring them again", path)
        return None
    data = torch.load(path, weights_only=True)
    mean = torch.complex(data["mean_real"], data["mean_imag"])
    if tuple(mean.shape) != (layers, q_heads, half):
        log.warning("cached query centres %s have shape %s, expected %s; measuring them again",
                    path, tuple(mean.shape), (layers, q_heads, half))
        return None
    return QueryCentres(mean, data["abs_mean"], fingerprint, manifest["text"], int(manifest["tokens"]))


def ensure_centres(model: ModelAccess) -> QueryCentres:
    """Cached centres of ``model``, measured (with the defaults) and cached first if needed."""
    adapter = model.adapter
    fingerprint = adapter.fingerprint()
    found = load_centres(fingerprint, adapter.spec.layers, adapter.q_heads, adapter.spec.head_dim // 2)
    if found is not None:
        return found
    log.info("triattention: no query centres cached for this model (%s); measuring them on %d tokens of "
             "%r (once; `slimkv calibrate triattention` redoes it with other text)",
             fingerprint, DEFAULT_TOKENS, DEFAULT_TEXT)
    centres = measure(model)
    path = save_centres(centres)
    log.info("triattention: query centres cached at %s", path)
    return centres
