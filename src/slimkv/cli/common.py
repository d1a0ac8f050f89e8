"""Pieces shared by the subcommands: model/compressor options, progress bars, output formatting."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import InputError


def add_model_options(p: argparse.ArgumentParser) -> None:
    from ..models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model: {DEFAULT_MODEL} (embedded, default), a local folder or .gguf file, or a hub id")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and KV dtype (default float32)")
    p.add_argument("--device", default="cpu",
                   help="where the model and its KV cache run: cpu (default), cuda, cuda:1, ...")


def add_compressor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compressor", default="none", metavar="NAME",
                   help="compression method (default none = full cache), or methods joined by '+' in "
                        "the order eviction, merging, quantization, e.g. snapkv+kivi2, snapkv+kvmerger "
                        "(freed entries merged, not dropped); `slimkv methods` lists them")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, default=None,
                        help="fraction of KV entries removed, in [0, 1) (0.75 keeps a quarter); in a "
                             "composition it goes to the eviction and merging methods")
    amount.add_argument("--budget", type=int, default=None, help="KV entries kept per layer and KV head")
    p.add_argument("--phase", choices=["prefill", "decode", "both"], default=None,
                   help="when to compress: the prompt, while generating, or both (default: the method's)")
    p.add_argument("--allocation", choices=["uniform", "head"], default=None,
                   help="how a layer's budget is spread over its KV heads: uniform (the same for every head) "
                        "or head (AdaKV: by score over all heads, prefill phase only; heads are stored "
                        "ragged, in pages). Default: the method's (head for adasnapkv and fastgen)")


def build_compressor(args: argparse.Namespace):
    from ..compressors import make_compressor

    params = {} if getattr(args, "allocation", None) is None else {"allocation": args.allocation}
    return make_compressor(args.compressor, ratio=args.ratio, budget=args.budget, phase=args.phase, **params)


def open_store(spec: str):
    """A :class:`~slimkv.store.TierStack` from the ``--store`` syntax (errors are ConfigErrors)."""
    from ..store import parse_store_spec

    return parse_store_spec(spec)


def read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {path!r} does not exist (or is not a file)")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path!r} is not UTF-8 text ({exc.reason})") from exc


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


class PrefillBar:
    """A tqdm bar on stderr for prompts longer than ``threshold`` tokens (callable as a progress fn)."""

    def __init__(self, enabled: bool = True, threshold: int = 2048) -> None:
        self.enabled, self.threshold, self.bar = enabled, threshold, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < self.threshold:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover
