"""``slimkv demo``: a short needle retrieval on the embedded model, full cache against a compressed one."""

from __future__ import annotations

import argparse
import json

from .common import add_model_options, human_bytes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="a short demo: needle retrieval with the full cache and with a compressed one",
        description="Hide a number in ~1,000 tokens of text, ask for it with the full KV cache and with a "
                    "compressed one, and show both answers with the KV bytes each cache held.",
    )
    add_model_options(p)
    p.add_argument("--compressor", default="snapkv", metavar="NAME", help="method to compare (default snapkv)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of KV entries removed (default 0.5)")
    p.add_argument("--tokens", type=int, default=1000, help="prompt length in tokens (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compressors import make_compressor
    from ..engine import Engine, GenerationConfig, Request
    from ..evals.needle import needle_sample
    from ..models import load_model

    compressor = make_compressor(args.compressor, ratio=args.ratio)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    sample = needle_sample(tokenizer, args.tokens, depth=0.4, seed=7)
    request = Request(context=sample.context + sample.question)
    config = GenerationConfig(max_new_tokens=8, stop=("\n",))
    rows = []
    for comp in (make_compressor("none"), compressor):
        result = Engine(model, tokenizer, comp).generate(request, config)
        rows.append((comp, result))
    if args.json:
        print(json.dumps([{
            "compressor": comp.describe(), "answer": r.text.strip(), "expected": sample.answer,
            "correct": sample.answer in r.text, "bytes_full": r.cache.bytes_full, "bytes_kept": r.cache.bytes_kept,
        } for comp, r in rows]))
        return 0
    print(f"Needle: 'The special magic number is {sample.answer}' hidden at 40% of a "
          f"{rows[0][1].prompt_tokens}-token prompt.\n")
    for comp, r in rows:
        mark = "correct" if sample.answer in r.text else "wrong"
        print(f"{comp.describe():<40} answer: {r.text.strip()!r:<12} ({mark})")
        after = r.cache_after_prefill
        saved = f"{after.saved_fraction * 100:.0f}% saved" if comp.compresses else "positions included"
        print(f"{'':<40} KV held after prefill: {human_bytes(after.bytes_kept)} for "
              f"{human_bytes(after.bytes_full)} of full-cache KV ({saved})")
    return 0
