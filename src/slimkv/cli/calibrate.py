"""``slimkv calibrate``: fit a calibrated method's per-model data ahead of its first use (CommVQ codebooks)."""

from __future__ import annotations

import argparse
import json

from .common import add_model_options


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="fit per-model calibration data (CommVQ codebooks)",
        description="Fit CommVQ codebooks for a model on offline real text (King James Bible) and cache them "
                    "under the user cache directory (<cache>/commvq). The first use of commvq1/commvq2 on a "
                    "model without codebooks does the same automatically.")
    p.add_argument("method", choices=["commvq"], help="the method to calibrate")
    add_model_options(p)
    p.add_argument("--bits", type=int, choices=[2, 1], default=2, help="bits per element: 2 (commvq2) or 1 (commvq1)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens of real text (default 4096)")
    p.add_argument("--iters", type=int, default=2, help="EM iterations per code stage (default 2)")
    p.add_argument("--force", action="store_true", help="refit even when cached codebooks verify")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compressors import make_compressor
    from ..compressors.quantization import commvq_calibration as cal
    from ..models import ModelAdapter, load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    adapter = ModelAdapter(model)
    comp = make_compressor(f"commvq{args.bits}", tokens=args.tokens, iters=args.iters)
    calib = comp.calibration(adapter.spec.head_dim)
    path = cal.codebook_path(adapter.fingerprint(), calib)
    if args.force:
        path.unlink(missing_ok=True)
    books = cal.load_or_fit(adapter, tokenizer, calib)
    print(json.dumps({
        "path": str(path), "stages": calib.stages, "tokens": calib.tokens, "iters": calib.iters,
        "key_error": round(float(books["k_error"][..., -1].mean()), 4),
        "value_error": round(float(books["v_error"][..., -1].mean()), 4),
    }, indent=1))
    return 0
