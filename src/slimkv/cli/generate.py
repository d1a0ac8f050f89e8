"""``slimkv generate``: one prompt through the engine, with KV bytes saved and speed."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from .common import (
    PrefillBar,
    add_compressor_options,
    add_model_options,
    build_compressor,
    human_bytes,
    open_store,
    read_text,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text with a compressed KV cache",
        description="Generate from a prompt, or from a context compressed before the question is seen "
                    "(--context-file/--context with --question: question-agnostic). Raw prompts by "
                    "default; --chat applies the model's chat template.",
    )
    add_model_options(p)
    add_compressor_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text (compressed whole)")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a file")
    src.add_argument("--context-file", metavar="F", help="context compressed before --question is appended")
    src.add_argument("--context", metavar="TEXT", help="like --context-file, given inline")
    p.add_argument("--question", help="question appended after the context is compressed")
    p.add_argument("--question-aware", action="store_true",
                   help="compress context and question together (the question is seen)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--prefill-chunk", type=int, default=4096, metavar="N",
                   help="prompt tokens per forward pass (default 4096)")
    p.add_argument("--store", default=None, metavar="SPEC",
                   help="reuse prompt KV through a store: memory, disk:PATH, redis://HOST:PORT, or a "
                        "comma-separated stack of them (e.g. memory,disk:PATH)")
    p.add_argument("--tenant", default="default", help="store namespace of this user (default 'default')")
    p.add_argument("--lossless", action="store_true",
                   help="draft with the compressed cache (or a lookup), keep only tokens the full cache "
                        "verifies: output identical to full-cache decoding")
    p.add_argument("--drafter", default="self", metavar="NAME",
                   help="with --lossless: self (the compressed cache drafts, default), prompt (n-gram lookup "
                        "in the prompt), rest:PATH (a datastore from `slimkv datastore build`), auto "
                        "(a long lookup match, else self), auto:PATH (adds a REST datastore)")
    p.add_argument("--draft-tokens", type=int, default=8, metavar="K",
                   help="with --lossless: longest draft per verify pass (default 8)")
    p.add_argument("--tree-nodes", type=int, default=16, metavar="N",
                   help="with --lossless and a REST datastore: draft tokens of REST's token tree, all "
                        "verified in one pass (default 16; 0 drafts only the most frequent path)")
    p.add_argument("--full-view", default="memory", metavar="WHERE",
                   help="with --lossless: where the full cache lives, memory (default) or disk:DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace):
    from ..engine import Request

    if args.prompt is not None or args.prompt_file is not None:
        if args.question is not None:
            raise InputError("--question goes with --context or --context-file, not with --prompt")
        text = args.prompt if args.prompt is not None else read_text(args.prompt_file, "prompt file")
        return Request(context=text, chat=args.chat)
    if args.question is None:
        raise InputError("--context/--context-file needs --question (the text appended after compression)")
    context = args.context if args.context is not None else read_text(args.context_file, "context file")
    question = args.question
    if context and not context[-1].isspace() and question and not question[0].isspace():
        question = "\n\n" + question
    if args.question_aware:
        return Request(context=context + question, chat=args.chat)
    return Request(context=context, question=question, chat=args.chat)


def lossless_config(args: argparse.Namespace):
    from ..engine import LosslessConfig

    if not args.lossless:
        if args.drafter != "self" or args.full_view != "memory":
            raise InputError("--drafter and --full-view go with --lossless")
        return None
    if args.store:
        raise InputError("--lossless does not reuse stored KV yet; drop --store")
    return LosslessConfig(drafter=args.drafter, draft_tokens=min(4, args.draft_tokens),
                          max_draft_tokens=args.draft_tokens, full_view=args.full_view,
                          tree_nodes=args.tree_nodes)


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine, GenerationConfig, SamplingConfig
    from ..models import load_model

    compressor = build_compressor(args)
    lossless = lossless_config(args)
    request = build_request(args)
    if not (request.context + request.question).strip():
        raise InputError("the prompt is empty; give some text to generate from")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
        stop=tuple(args.stop),
        lossless=lossless,
    )
    stack = open_store(args.store) if args.store else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(model, tokenizer, compressor, prefill_chunk=args.prefill_chunk)
    if stack is not None:
        engine.use_store(stack, tenant=args.tenant)
    bar = PrefillBar(enabled=sys.stderr.isatty() or not args.json)
    gen = engine.stream(request, config, progress=bar)
    try:
        for piece in gen:
            if not args.json:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
    finally:
        bar.close()
        if stack is not None:
            stack.close()  # waits for write-behind to land
    result = gen.results[0]
    if args.json:
        print(json.dumps(to_json(result, compressor)))
    else:
        print()
        print(summary(result, compressor))
    return 0


def to_json(result, compressor) -> dict:
    c, t = result.cache, result.timing
    return {
        "text": result.text,
        "tokens": {"prompt": result.prompt_tokens, "generated": len(result.token_ids)},
        "kv": {"tokens_full": c.tokens_full, "tokens_kept": c.tokens_kept,
               "bytes_full": c.bytes_full, "bytes_kept": c.bytes_kept},
        "timing": {"prefill_s": round(t.prefill_s, 4), "ttft_s": round(t.ttft_s, 4),
                   "decode_tokens_per_s": round(t.decode_tokens_per_s, 2)},
        "compressor": compressor.describe(),
        "finish_reason": result.finish_reason,
        **({"spec": spec_json(result.spec)} if result.spec is not None else {}),
        **({"store": {"hit_tokens": result.store.hit_tokens, "miss_tokens": result.store.miss_tokens,
                      "load_s": round(result.store.load_s, 4), "saved_s": round(result.store.saved_s, 4)}}
           if result.store is not None else {}),
    }


def spec_json(spec) -> dict:
    return {
        "drafted": spec.drafted, "accepted": spec.accepted, "verify_passes": spec.verify_passes,
        "mean_accepted_per_pass": round(spec.mean_accepted_per_pass, 3),
        "by_drafter": {name: {"verify_passes": p, "drafted": d, "accepted": a}
                       for name, (p, d, a) in spec.by_drafter.items()},
        "draft_view_bytes": spec.draft_view_bytes,
        "full_view": {"location": spec.full_view_location, "bytes": spec.full_view_bytes},
        "fallback": spec.fallback,
    }


def summary(result, compressor) -> str:
    c, t = result.cache, result.timing
    saved = c.saved_fraction * 100
    prefill_rate = result.prompt_tokens / t.prefill_s if t.prefill_s > 0 else 0.0
    return "\n".join([
        f"-- {compressor.describe()}: {result.prompt_tokens} prompt + {len(result.token_ids)} generated tokens "
        f"({result.finish_reason})",
        f"   KV cache: {human_bytes(c.bytes_full)} full -> {human_bytes(c.bytes_kept)} kept "
        f"({saved:.0f}% saved); {c.tokens_full} tokens -> {c.tokens_kept} kept per layer and KV head",
        f"   speed: prefill {t.prefill_s:.2f} s ({prefill_rate:.0f} tok/s), first token {t.ttft_s:.2f} s, "
        f"decode {t.decode_tokens_per_s:.1f} tok/s",
    ] + ([f"   store: {result.store.hit_tokens} prompt tokens reused ({result.store.load_s:.2f} s to load), "
          f"{result.store.miss_tokens} computed"] if result.store is not None else [])
      + ([f"   lossless: {result.spec.accepted} of {result.spec.drafted} drafted tokens accepted in "
          f"{result.spec.verify_passes} verify passes ({result.spec.mean_accepted_per_pass:.2f} per pass); "
          f"full view {human_bytes(result.spec.full_view_bytes)} in {result.spec.full_view_location}"
          + (" (FAILED: finished with plain full-cache decoding)" if result.spec.fallback else "")]
         if result.spec is not None else []))
