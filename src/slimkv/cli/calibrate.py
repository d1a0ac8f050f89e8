"""``slimkv calibrate METHOD``: measure a calibrated method's per-model data ahead of its first use.

triattention: the model's mean pre-RoPE query per layer and query head; commvq: CommVQ's codebooks;
kivi: which layers' keys 2-bit KIVI stores wide (each layer's key-quantization sensitivity). All are
cached under the user cache directory, keyed by the model's fingerprint (and checked), and every
method calibrates by itself on first use with the defaults; this command redoes it.
"""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from .common import add_model_options

METHODS = ("triattention", "commvq", "kivi")


def add_parser(sub) -> None:
    from ..compressors.calibration import DEFAULT_TEXT, DEFAULT_TOKENS

    p = sub.add_parser("calibrate", help="measure the per-model data a method needs (once, cached)",
                       description="triattention: measure a model's mean pre-RoPE query per layer and query "
                                   "head on real text. commvq: fit CommVQ codebooks on the King James Bible. "
                                   "kivi: measure each layer's sensitivity to 2-bit keys (copying a random "
                                   "span from Bible text) to pick kivi2's wide-key layers. "
                                   "The result is cached under the user cache directory (keyed by the model's "
                                   "fingerprint, and checked when loaded); every method does this by itself on "
                                   "first use with the defaults.")
    p.add_argument("method", choices=METHODS, help="the method to calibrate")
    add_model_options(p)
    p.add_argument("--tokens", type=int, default=None,
                   help=f"calibration tokens (default: triattention {DEFAULT_TOKENS}, commvq 4096; "
                        "kivi: tokens per probe window, default 768)")
    p.add_argument("--text", default=None,
                   help="triattention, kivi: haystack name (bible, essays, shakespeare, noise) or a UTF-8 "
                        f"text file (default {DEFAULT_TEXT})")
    p.add_argument("--bits", type=int, choices=[2, 1], default=2,
                   help="commvq: bits per element, 2 (commvq2, default) or 1 (commvq1)")
    p.add_argument("--iters", type=int, default=2, help="commvq: EM iterations per code stage (default 2)")
    p.add_argument("--force", action="store_true", help="commvq: refit even when cached codebooks verify")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import load_model

    if args.method in ("triattention", "kivi"):
        if args.force:
            raise InputError(f"--force goes with commvq; {args.method} always measures again")
        run_method = _triattention if args.method == "triattention" else _kivi
        out = run_method(args, *load_model(args.model, dtype=args.dtype, device=args.device))
    else:
        if args.text is not None:
            raise InputError("--text goes with triattention; commvq fits on the Bible haystack")
        out = _commvq(args, *load_model(args.model, dtype=args.dtype, device=args.device))
    if args.json:
        print(json.dumps(out))
    else:
        print("\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def _triattention(args: argparse.Namespace, model, tokenizer) -> dict:
    from ..compressors.calibration import DEFAULT_TEXT, DEFAULT_TOKENS, measure, save_centres
    from ..engine import Engine

    engine = Engine(model, tokenizer)
    centres = measure(engine.runner, tokens=args.tokens or DEFAULT_TOKENS, text=args.text or DEFAULT_TEXT)
    path = save_centres(centres)
    # how concentrated the queries are: |E q| / E|q| per pair, averaged (1 = every query on its centre)
    concentration = float((centres.mean.abs() / centres.abs_mean.clamp(min=1e-12)).mean())
    return {"method": args.method, "model": args.model, "fingerprint": centres.model, "text": centres.text,
            "tokens": centres.tokens, "path": str(path), "concentration": round(concentration, 4)}


def _commvq(args: argparse.Namespace, model, tokenizer) -> dict:
    from ..compressors import make_compressor
    from ..compressors.quantization import commvq_calibration as cal
    from ..engine import Engine

    runner = Engine(model, tokenizer).runner
    adapter = runner.adapter
    comp = make_compressor(f"commvq{args.bits}", tokens=args.tokens or 4096, iters=args.iters)
    calib = comp.calibration(adapter.spec.head_dim)
    path = cal.codebook_path(adapter.fingerprint(), calib)
    if args.force:
        path.unlink(missing_ok=True)
    books = cal.load_or_fit(runner, calib)
    return {"method": args.method, "model": args.model, "path": str(path), "stages": calib.stages,
            "tokens": calib.tokens, "iters": calib.iters,
            "key_error": round(float(books["k_error"][..., -1].mean()), 4),
            "value_error": round(float(books["v_error"][..., -1].mean()), 4)}


def _kivi(args: argparse.Namespace, model, tokenizer) -> dict:
    from ..compressors import make_compressor
    from ..compressors.quantization import kivi_calibration as cal
    from ..engine import Engine

    engine = Engine(model, tokenizer)
    comp = make_compressor("kivi2")
    result = cal.measure(engine.runner, comp.spec, text=args.text or cal.DEFAULT_TEXT,
                         context=args.tokens or cal.DEFAULT_CONTEXT)
    path = cal.save(result, comp.spec)
    return {"method": args.method, "model": args.model, "fingerprint": result.model, "text": result.text,
            "probes": result.probes, "path": str(path), "copy_nll": round(result.base_nll, 4),
            "wide_key_layers": result.most_sensitive(comp.wide_keys),
            "most_sensitive": [[i, round(result.nll_increase[i], 4)] for i in result.most_sensitive(5)]}
