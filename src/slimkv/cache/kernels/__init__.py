"""A fused CPU kernel for decoding over a quantized layer: attention straight from packed codes.

Dequantizing a layer in PyTorch costs several passes over float copies of the keys and values, which
at 8k tokens is slower than reading the full-precision cache. ``quant_attend.c`` reads the packed
codes once instead, folding the scales and zero points into the query (keys, per channel) and into
the attention weights (values, per token)::

    q . k_t = sum_d (q_d * scale_gd) * code_td + sum_d q_d * zero_gd        g: the key group of t
    sum_t p_t v_t = sum_t (p_t * scale_t) * code_t + sum_t p_t * zero_t      per value group

Contract: :func:`available` says whether a call can use the kernel (float32 on the CPU, the library
compiled); :func:`decode_attention` returns what ``attend_rows`` would for queries that see every
entry (decoding, no sliding window bite, no softcap). The library is compiled with the system C
compiler on first use into ``~/.cache/slimkv/kernels`` (a file named by the hash of source, flags and
machine); without a compiler the layer falls back to dequantizing in PyTorch (a logged warning).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..quantized import QuantizedLayer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_attend.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
MAX_HEAD_DIM = 1024  # the kernel's per-entry scratch row
#: entries per thread's partial sum of the value pass (chunks per (batch, head) row)
VALUE_CHUNKS = 8

_state: dict[str, object] = {"lib": None, "tried": False, "enabled": True}


def _cache_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "slimkv" / "kernels"


def _cpu() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU flags."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    return platform.machine() + flags


def _compile() -> ctypes.CDLL | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: quantized layers are read by dequantizing in PyTorch (slower)")
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu().encode()).hexdigest()[:16]
    target = _cache_dir() / f"quant_attend-{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("compiling the quantized attention kernel failed; using PyTorch instead:\n%s",
                            proc.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(str(target))
    ints = [ctypes.c_int] * 8
    lib.kivi_scores.argtypes = ints + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    lib.kivi_values.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    return lib


def _lib() -> ctypes.CDLL | None:
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["lib"] = _compile()
        except OSError as exc:
            log.warning("loading the quantized attention kernel failed (%s); using PyTorch instead", exc)
    return _state["lib"]  # type: ignore[return-value]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside this block quantized layers are read through the PyTorch path (tests, benchmarks)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def compiled() -> bool:
    """Whether the kernel library is built and loaded (compiling it on first call)."""
    return _lib() is not None


def available(query: Tensor, layer: QuantizedLayer) -> bool:
    return (bool(_state["enabled"]) and query.device.type == "cpu" and query.dtype == torch.float32
            and layer.dtype == torch.float32 and query.shape[-1] <= MAX_HEAD_DIM and _lib() is not None)


def _ptr(t: Tensor) -> int:
    assert t.is_contiguous()
    return t.data_ptr()


def decode_attention(query: Tensor, layer: QuantizedLayer, scale: float) -> Tensor:
    """Attention of queries that see every entry of ``layer``: ``[B, Hq, T, D]`` -> ``[B, Hq, T, D]``."""
    lib = _lib()
    assert lib is not None and layer.k_codes is not None and layer.v_codes is not None
    spec = layer.spec
    batch, q_heads, tokens, dim = query.shape
    heads = layer.k_codes.shape[1]
    rows = q_heads // heads * tokens
    n = layer.quantized_length
    groups = layer.k_scale.shape[2]
    vg = spec.value_group(dim)
    nv = dim // vg
    threads = torch.get_num_threads()
    q = query.reshape(batch, heads, rows, dim)  # rows ordered (group member, token), as attend_rows
    # keys: fold each group's per-channel scale into the query, its zero point into a bias
    qs = (q[:, :, None] * layer.k_scale.float()[:, :, :, None, :]).contiguous()  # [B, H, NG, R, D]
    qz = (layer.k_zero.float() @ q.transpose(-1, -2)).contiguous()  # [B, H, NG, R]
    scores = torch.empty(batch, heads, rows, n)
    lib.kivi_scores(batch * heads, n, dim, rows, spec.bits, spec.group, layer.k_pad, groups,
                    _ptr(layer.k_codes), _ptr(qs), _ptr(qz), _ptr(scores), threads)
    res_n = layer.residual.max_length
    if res_n:
        rk, rv, _ = layer.residual.view()  # [B, H, r, D]
        scores = torch.cat([scores, q @ rk.transpose(-1, -2)], dim=-1)
    probs = (scores * scale).softmax(dim=-1)  # [B, H, R, Q + r]
    pq = probs[..., :n]
    # values: fold each entry's scale into its weight, its zero point into a bias per value group
    w = (pq[..., None] * layer.v_scale.float()[:, :, None]).contiguous()  # [B, H, R, Q, NV]
    partial = torch.zeros(batch, heads, VALUE_CHUNKS, rows, dim)
    lib.kivi_values(batch * heads, n, dim, rows, spec.bits, nv, VALUE_CHUNKS,
                    _ptr(layer.v_codes), _ptr(w), _ptr(partial), threads)
    out = partial.sum(dim=2)  # [B, H, R, D]
    out += (pq @ layer.v_zero.float()).repeat_interleave(vg, dim=-1)
    if res_n:
        out += probs[..., n:] @ rv
    return out.view(batch, heads, q_heads // heads, tokens, dim).reshape(batch, q_heads, tokens, dim)
