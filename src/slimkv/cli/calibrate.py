"""``slimkv calibrate triattention``: measure and cache a model's pre-RoPE query centres."""

from __future__ import annotations

import argparse
import json

from .common import add_model_options

METHODS = ("triattention",)


def add_parser(sub) -> None:
    from ..compressors.calibration import DEFAULT_TEXT, DEFAULT_TOKENS

    p = sub.add_parser("calibrate", help="measure the statistics a method needs for a model (once, cached)",
                       description="Measure a model's mean pre-RoPE query per layer and query head on real "
                                   "text and cache it under the user cache directory (keyed by the model's "
                                   "fingerprint, with a checksum). TriAttention measures them by itself "
                                   "on first use with the defaults; this command redoes it with other text.")
    p.add_argument("method", choices=METHODS, help="the method to calibrate")
    add_model_options(p)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"calibration tokens (default {DEFAULT_TOKENS})")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="haystack name (bible, essays, shakespeare, noise) or a UTF-8 text file "
                        f"(default {DEFAULT_TEXT})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compressors.calibration import measure, save_centres
    from ..engine import Engine
    from ..models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    engine = Engine(model, tokenizer)
    centres = measure(engine, tokens=args.tokens, text=args.text)
    path = save_centres(centres)
    # how concentrated the queries are: |E q| / E|q| per pair, averaged (1 = every query on its centre)
    concentration = float((centres.mean.abs() / centres.abs_mean.clamp(min=1e-12)).mean())
    out = {"method": args.method, "model": args.model, "fingerprint": centres.model, "text": centres.text,
           "tokens": centres.tokens, "path": str(path), "concentration": round(concentration, 4)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.method}: query centres of {args.model} measured on {centres.tokens} tokens of "
              f"{centres.text!r}; mean concentration |E q| / E|q| = {concentration:.3f}; cached at {path}")
    return 0
