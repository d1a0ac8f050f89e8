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

from ..rotation import rotate, unrotate

if TYPE_CHECKING:
    from ..quantized import QuantizedLayer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_attend.c")
#: Compile flags. -ffast-math vectorizes the softmax's exp (glibc's libmvec) and the dot products'
#: sums, about 20% faster; the kernel never relies on infinities or NaNs (its softmax starts from a
#: real score). It is given to the compile step only: linking with it would add gcc's crtfastmath,
#: which flushes denormals to zero for the whole process as the library loads.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
LINK = ["-shared", "-fopenmp", "-lm"]
MAX_HEAD_DIM = 1024  # the kernel's per-entry scratch row

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
    tag = hashlib.sha256(source + " ".join(FLAGS + LINK).encode() + _cpu().encode()).hexdigest()[:16]
    target = _cache_dir() / f"quant_attend-{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built, obj = Path(tmp) / target.name, Path(tmp) / "quant_attend.o"
            proc = subprocess.run([compiler, *FLAGS, "-c", str(SOURCE), "-o", str(obj)], capture_output=True, text=True)
            if proc.returncode == 0:
                proc = subprocess.run([compiler, str(obj), *LINK, "-o", str(built)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("compiling the quantized attention kernel failed; using PyTorch instead:\n%s",
                            proc.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(str(target))
    lib.kivi_decode.argtypes = ([ctypes.c_int] * 11 + [ctypes.c_float] + [ctypes.c_void_p] * 10
                                + [ctypes.c_int])
    lib.kivi_decode.restype = None
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
    q = query.reshape(batch, heads, rows, dim)  # rows ordered (group member, token), as attend_rows
    # the full-precision entries (sinks, then the residual) are read as one block after the codes
    dense = [part.view()[:2] for part in (layer.sinks, layer.residual) if part is not None and part.max_length]
    res_k = torch.cat([k for k, _ in dense], dim=2) if dense else q  # [B, H, r, D]
    res_v = torch.cat([v for _, v in dense], dim=2) if dense else q  # (not read when r == 0)
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
    return out.view(batch, heads, q_heads // heads, tokens, dim).reshape(batch, q_heads, tokens, dim)
