"""TriAttention's protected recent window (share recent of the budget), measured: decode-phase streaming perplexity, one run.

Held-out Bible text (character offset 200,000, as ``slimkv eval perplexity``) fed one token at a time on
the embedded model; every method keeps at most ``--budget`` entries per layer and KV head. The full
cache and StreamingLLM are measured in the same run as the TriAttention variants.

    OMP_NUM_THREADS=1 python benchmarks/triattention_window.py [--tokens 512] [--budget 128] [--recents 0.125,0.5]

Prints JSON rows; ``--out`` also writes them with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys

from slimkv.compressors import make_compressor
from slimkv.engine import Engine
from slimkv.evals.fidelity import perplexity
from slimkv.evals.haystacks import load_haystack
from slimkv.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--recents", default="0.125,0.5", help="comma-separated triattention recent shares")
    p.add_argument("--offset", type=int, default=200_000)
    p.add_argument("--out", default=None, help="write {command, rows} JSON here")
    args = p.parse_args()
    model, tokenizer = load_model()
    engine = Engine(model, tokenizer)
    text = load_haystack("bible")[args.offset:]
    tokens = tokenizer.encode(text[: (args.tokens + 1) * 8])[: args.tokens + 1]
    methods = {"none": None,
               "streaming_llm": make_compressor("streaming_llm", budget=args.budget, phase="decode")}
    for share in (float(x) for x in args.recents.split(",")):
        methods[f"triattention(recent={share})"] = make_compressor("triattention", budget=args.budget,
                                                                   phase="decode", recent=share)
    rows = []
    for name, comp in methods.items():
        r = perplexity(engine, tokens, comp, name)
        rows.append({**r.__dict__, "budget": args.budget})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        command = "OMP_NUM_THREADS=1 python benchmarks/triattention_window.py " + " ".join(sys.argv[1:])
        with open(args.out, "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
