"""CommVQ codebooks of a model: fitted once on real text, cached per model under the user cache directory.

Paper: Li et al., "CommVQ: Commutative Vector Quantization for KV Cache Compression", ICML 2025,
arXiv:2506.18879 (codebooks fitted by EM on calibration KV).

Calibration runs the model over the first ``tokens`` tokens of offline real text (the King James
Bible haystack, ``evals/haystacks.py``) with a full cache, rotates the keys back to before RoPE,
scales every key and value to unit norm and fits one residual codebook set per layer, KV head and
kind (keys, values) with :func:`~slimkv.cache.vq_codes.fit_codebooks`.

The result is one file ``<cache>/commvq/<model fingerprint>-<settings>.pt`` with a SHA-256 sidecar
(``.sha256``); a file failing its checksum or unreadable is logged and refitted. Recorded command:
``slimkv calibrate commvq [--model M] [--bits 2|1] [--tokens N]``; the first use of commvq on a model
without codebooks runs the same fit automatically (with a log message).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...cache.vq_codes import fit_codebooks, rope
from ...errors import ConfigError, InputError
from ...models.embedded import cache_root, sha256
from ..base import ModelAccess
from ..calibration import write_atomically

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the fit or the file layout changes: old files are then ignored
TEXT = "bible"


@dataclass(frozen=True)
class Calibration:
    """How codebooks are fitted.

    stages: one-byte codes per entry and head (bits per element follow from it and head_dim)
    tokens: calibration tokens of real text; iters: EM iterations per stage; seed: initialisation
    """

    stages: int
    tokens: int = 4096
    iters: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ConfigError(f"CommVQ needs at least one code stage, got {self.stages}")
        if self.tokens < 64:
            raise ConfigError(f"calibration needs at least 64 tokens of text, got {self.tokens}")
        if self.iters < 1:
            raise ConfigError(f"calibration needs at least one EM iteration, got {self.iters}")

    def key(self) -> str:
        return f"s{self.stages}-t{self.tokens}-i{self.iters}-seed{self.seed}-{TEXT}-v{FORMAT}"


def codebook_dir() -> Path:
    """Where codebooks are cached: ``<slimkv cache>/commvq``."""
    return cache_root() / "commvq"


def codebook_path(fingerprint: str, calib: Calibration, directory: Path | None = None) -> Path:
    return (directory or codebook_dir()) / f"{fingerprint}-{calib.key()}.pt"


def load(path: Path) -> dict[str, Tensor] | None:
    """The codebooks stored at ``path``, or None when missing, incomplete or failing the checksum."""
    sidecar = path.with_suffix(".sha256")
    if not path.is_file() or not sidecar.is_file():
        return None
    if sidecar.read_text().strip() != sha256(path):
        log.warning("CommVQ codebooks %s fail their checksum; refitting them", path)
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refitted
        log.warning("CommVQ codebooks %s are unreadable (%s); refitting them", path, exc)
        return None
    return data


def save(path: Path, books: dict[str, Tensor]) -> None:
    """Write atomically (``calibration.write_atomically``), then the checksum beside it."""
    digest = write_atomically(path, lambda tmp: torch.save(books, tmp))
    path.with_suffix(".sha256").write_text(digest + "\n")


def calibration_ids(tokenizer, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of the calibration text."""
    from ...evals.haystacks import load_haystack

    text = load_haystack(TEXT)
    ids: list[int] = []
    chars = tokens * 6
    while len(ids) < tokens and chars < 4 * len(text):
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        chars *= 2
    if len(ids) < tokens:
        raise InputError(f"the calibration text holds only {len(ids)} tokens; use --tokens {len(ids)} or fewer")
    return ids[:tokens]


def collect(model: ModelAccess, tokens: int) -> tuple[Tensor, Tensor]:
    """Pre-RoPE keys and values of the calibration text: ``[layers, kv_heads, tokens, head_dim]`` each."""
    adapter = model.adapter
    if tokens > adapter.max_positions:
        raise ConfigError(f"--tokens {tokens} exceeds the model's {adapter.max_positions} positions")
    inv_freq = adapter.rope_table()  # [layers, D/2]
    ids = calibration_ids(model.tokenizer, tokens)
    cache = model.new_cache()
    model.prefill(cache, ids)
    keys, values = [], []
    for i, layer in enumerate(cache.layers):
        k, v, pos = layer.view()  # [1, H, N, D], [1, H, N, D], [1, H, N]
        keys.append(rope(k[0].float(), pos[0], -inv_freq[i]))
        values.append(v[0].float())
    return torch.stack(keys), torch.stack(values)


def fit(model: ModelAccess, calib: Calibration) -> dict[str, Tensor]:
    """Collect calibration KV and fit codebooks: ``k_alpha, k_beta, v_alpha, v_beta`` of shape
    ``[layers, kv_heads, stages, HALF, head_dim]`` and the relative errors ``k_error, v_error``
    ``[layers, kv_heads, stages]`` on the calibration vectors."""
    t0 = time.perf_counter()
    keys, values = collect(model, calib.tokens)
    layers, heads, n, dim = keys.shape
    out: dict[str, Tensor] = {}
    for kind, x in (("k", keys), ("v", values)):
        alpha, beta, err = fit_codebooks(x.reshape(layers * heads, n, dim), calib.stages, calib.iters, calib.seed)
        shape = (layers, heads, calib.stages)
        out[f"{kind}_alpha"], out[f"{kind}_beta"] = alpha.reshape(*shape, *alpha.shape[2:]), \
            beta.reshape(*shape, *beta.shape[2:])
        out[f"{kind}_error"] = err.reshape(shape)
    log.info("CommVQ codebooks fitted in %.0f s: relative squared error after %d stages: keys %.3f, values %.3f",
             time.perf_counter() - t0, calib.stages, float(out["k_error"][..., -1].mean()),
             float(out["v_error"][..., -1].mean()))
    return out


def load_or_fit(model: ModelAccess, calib: Calibration, directory: Path | None = None) -> dict[str, Tensor]:
    """Cached codebooks of this model and settings; fitted (and cached) first when missing or corrupt."""
    path = codebook_path(model.adapter.fingerprint(), calib, directory)
    books = load(path)
    if books is not None:
        return books
    log.warning("no CommVQ codebooks for this model (%s); fitting them on %d tokens of %s text "
             "(`slimkv calibrate commvq` does this ahead of time)", path.name, calib.tokens, TEXT)
    books = fit(model, calib)
    save(path, books)
    return books
