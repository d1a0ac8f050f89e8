"""``slimkv datastore build FILES... --out PATH``: a REST datastore over the token ids of a corpus."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import InputError
from .common import add_model_options, human_bytes, read_text


def add_parser(sub) -> None:
    p = sub.add_parser("datastore", help="build a REST datastore for `generate --lossless --drafter rest:PATH`",
                       description="Token-id datastores for REST drafting (He et al., arXiv:2311.08252).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="tokenize text files and index them (suffix array)")
    build.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, one document each")
    build.add_argument("--out", required=True, metavar="PATH", help="datastore file to write")
    add_model_options(build)
    build.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..speculative.datastore import Datastore, tokenizer_fingerprint

    texts = [read_text(f, "corpus file") for f in args.files]
    if not any(t.strip() for t in texts):
        raise InputError("the corpus files are empty; give some text to index")
    _, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    store = Datastore.build(docs, tokenizer_fingerprint(tokenizer))
    size = store.save(args.out)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"out": args.out, "documents": len(docs), "tokens": int(sum(map(len, docs))),
                          "bytes": size, "seconds": round(seconds, 3)}))
    else:
        print(f"datastore {args.out}: {len(docs)} documents, {sum(map(len, docs))} tokens, "
              f"{human_bytes(size)} ({seconds:.1f} s)")
    return 0
