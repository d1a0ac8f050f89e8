"""Fused CPU kernels for decoding: over a quantized layer straight from packed codes, and over the
dense caches of a whole batch in one call.

Dense (``dense_attend.c``): a running batch holds one cache per sequence; :func:`dense_decode`
reads every row's dense layer in one call (one task per row and KV head), so a batch costs one
pass over its KV instead of one attention call per row.

Quantized (``quant_attend.c``): dequantizing a layer in PyTorch costs several passes over float copies of the keys and values, which
at 8k tokens is slower than reading the full-precision cache. ``quant_attend.c`` reads the packed
codes once instead, folding the scales and zero points into the query (keys, per channel) and into
the attention weights (values, per token)::

    q . k_t = sum_d (q_d * scale_gd) * code_td + sum_d q_d * zero_gd        g: the key group of t
    sum_t p_t v_t = sum_t (p_t * scale_t) * code_t + sum_t p_t * zero_t      per value group

Contract: :func:`available` / :func:`dense_available` say whether a call can use a kernel (the CPU,
the library compiled; float32, or bfloat16 for dense storage); :func:`decode_attention` and
:func:`dense_decode` return what ``attend_rows`` would for queries that see every entry (decoding, no
sliding window bite, no softcap), up to float32 rounding. The library is compiled with the system C
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

from ..rotation import rotate, unrotate

if TYPE_CHECKING:
    from ..quantized import QuantizedLayer

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("quant_attend.c", "dense_attend.c")]
#: Compile flags. -ffast-math vectorizes the softmax's exp (glibc's libmvec) and the dot products'
#: sums, about 20% faster; the kernel never relies on infinities or NaNs (its softmax starts from a
#: real score). It is given to the compile step only: linking with it would add gcc's crtfastmath,
#: which flushes denormals to zero for the whole process as the library loads.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
LINK = ["-shared", "-fopenmp", "-lm"]
MAX_HEAD_DIM = 1024  # the kernels' per-entry scratch row
MAX_GROUP = 64  # query heads per KV head the dense kernel handles

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
    source = b"".join(path.read_bytes() for path in SOURCES)
    tag = hashlib.sha256(source + " ".join(FLAGS + LINK).encode() + _cpu().encode()).hexdigest()[:16]
    target = _cache_dir() / f"attend-{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            objects = [Path(tmp) / f"{path.stem}.o" for path in SOURCES]
            for path, obj in zip(SOURCES, objects):
                proc = subprocess.run([compiler, *FLAGS, "-c", str(path), "-o", str(obj)], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    break
            if proc.returncode == 0:
                proc = subprocess.run([compiler, *map(str, objects), *LINK, "-o", str(built)], capture_output=True,
                                      text=True)
            if proc.returncode != 0:
                log.warning("compiling the attention kernels failed; using PyTorch instead:\n%s", proc.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(str(target))
    lib.kivi_decode.argtypes = ([ctypes.c_int] * 11 + [ctypes.c_float] + [ctypes.c_void_p] * 10
                                + [ctypes.c_int])
    lib.kivi_decode.restype = None
    lib.dense_decode.argtypes = [ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 6 + [ctypes.c_int]
    lib.dense_decode.restype = None
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
    """Whether :func:`decode_attention` can read ``layer`` (float32 or bfloat16 models, on the CPU)."""
    floats = (torch.float32, torch.bfloat16)
    return (bool(_state["enabled"]) and query.device.type == "cpu" and query.dtype in floats
            and layer.dtype in floats and query.shape[-1] <= MAX_HEAD_DIM and _lib() is not None)


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
    q = query.reshape(batch, heads, rows, dim).float()  # rows ordered (group member, token), as attend_rows
    # the full-precision entries (sinks, then the residual) are read as one block after the codes
    dense = [part.view()[:2] for part in (layer.sinks, layer.residual) if part is not None and part.max_length]
    res_k = torch.cat([k for k, _ in dense], dim=2).float() if dense else q  # [B, H, r, D]
    res_v = torch.cat([v for _, v in dense], dim=2).float() if dense else q  # (not read when r == 0)
    extra = res_k.shape[2] if dense else 0
    if spec.rotate:  # codes hold K R and V R: rotate the query and the dense entries alike, un-rotate after
        q, res_k, res_v = rotate(q), rotate(res_k), rotate(res_v)
    q, res_k, res_v = q.contiguous(), res_k.contiguous(), res_v.contiguous()
    # float16 parameters widened here (a few small vectorized copies; C would convert them one by one)
    k_scale, k_zero, v_scale, v_zero = (t.float() for t in (layer.k_scale, layer.k_zero, layer.v_scale, layer.v_zero))
    out = torch.empty_like(q)
    lib.kivi_decode(batch * heads, layer.quantized_length, extra, dim, rows, spec.kbits, spec.bits,
                    spec.group, layer.k_pad, layer.k_scale.shape[2], layer.v_scale.shape[-1], scale,
                    _ptr(q), _ptr(layer.k_codes), _ptr(k_scale), _ptr(k_zero), _ptr(layer.v_codes),
                    _ptr(v_scale), _ptr(v_zero), _ptr(res_k), _ptr(res_v), _ptr(out),
                    torch.get_num_threads())
    if spec.rotate:
        out = unrotate(out)
    return out.to(query.dtype).view(batch, heads, q_heads // heads, tokens, dim).reshape(batch, q_heads, tokens, dim)


def dense_available(query: Tensor, dtype: torch.dtype, groups: int) -> bool:
    """Whether :func:`dense_decode` can read dense storage of ``dtype`` for ``query`` [B, Hq, 1, D]."""
    return (bool(_state["enabled"]) and query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)
            and dtype in (torch.float32, torch.bfloat16) and query.shape[-1] <= MAX_HEAD_DIM
            and groups <= MAX_GROUP and _lib() is not None)


def dense_decode(query: Tensor, keys: list[Tensor], values: list[Tensor], lengths: list[int], scale: float) -> Tensor:
    """One query token per row over each row's dense entries: ``[B, Hq, 1, D]`` -> ``[B, Hq, 1, D]``.

    keys, values: per row the layer's storage ``[1, H, capacity, D]`` (contiguous, float32 or bfloat16,
    all alike); lengths: entries of every (row, head), row-major (``B * H`` values): slots ``[0, n)``
    """
    lib = _lib()
    assert lib is not None
    batch, q_heads, _, dim = query.shape
    heads = keys[0].shape[1]
    q = query.reshape(batch, q_heads, dim).float().contiguous()
    out = torch.empty_like(q)
    kaddr = torch.tensor([_ptr(k) for k in keys], dtype=torch.int64)
    vaddr = torch.tensor([_ptr(v) for v in values], dtype=torch.int64)
    stride = torch.tensor([k.shape[2] * dim for k in keys], dtype=torch.int64)
    length = torch.tensor(lengths, dtype=torch.int64)
    lib.dense_decode(batch, heads, q_heads // heads, dim, int(keys[0].dtype == torch.bfloat16), scale, _ptr(q),
                     _ptr(kaddr), _ptr(vaddr), _ptr(stride), _ptr(length), _ptr(out), torch.get_num_threads())
    return out.to(query.dtype).view(batch, q_heads, 1, dim)
