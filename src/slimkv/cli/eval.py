"""``slimkv eval TASK`` and ``slimkv eval suite``: accuracy against the full cache on the same samples."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError, InputError
from .common import add_model_options


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _engine(args: argparse.Namespace):
    """The model under test (full cache engine) and its tokenizer."""
    from ..engine import Engine
    from ..models import load_model


    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    return Engine(model, tokenizer), tokenizer


def _names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--lengths", type=_ints, default=[1000, 2000, 4000], help="prompt lengths in tokens (default 1000,2000,4000)")
    p.add_argument("--samples", type=int, default=5, help="samples per length (default 5)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--haystack", default="noise", help="noise, bible, essays, shakespeare, or a text file")
    p.add_argument("--needle", default=None, help="needle template holding {value} (and {key} for key tasks)")
    p.add_argument("--question", default=None, help="question template")
    p.add_argument("--answer-prefix", default=None, help="text the answer starts with")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")


def add_parser(sub) -> None:
    from ..evals.tasks import TASKS

    p = sub.add_parser("eval", help="score methods on long-context tasks against the full cache",
                       description="Score a compression method on a generated task, next to the full "
                                   "cache on the same samples. `slimkv eval suite` runs many at once.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in sorted(TASKS):
        t = tasks.add_parser(name, help=TASKS[name].description, description=TASKS[name].description)
        _common(t)
        t.add_argument("--compressor", default="snapkv", metavar="NAME", help="method (default snapkv)")
        amount = t.add_mutually_exclusive_group()
        amount.add_argument("--ratio", type=float, default=None,
                            help="fraction of KV removed (default 0.5; none for a quantizer such as kivi2, commvq2)")
        amount.add_argument("--budget", type=int, default=None, help="entries kept per layer and KV head")
        t.add_argument("--question-aware", action="store_true", help="compress with the question in the prompt")
        t.add_argument("--out", default=None, help="append per-sample JSON lines here (resumable)")
        t.add_argument("--json", action="store_true", help="print one JSON object")
        t.set_defaults(func=run_task)
    f = tasks.add_parser("fidelity", help="agreement with the full cache along its own continuation",
                         description="Top-1 agreement, mean KL divergence and first differing token of "
                                     "each method against the full cache, teacher-forced on the full "
                                     "cache's greedy continuation of real text.")
    add_model_options(f)
    f.add_argument("--compressors", default="streaming_llm,knorm,snapkv,h2o", help="comma-separated methods")
    f.add_argument("--ratio", type=float, default=0.5, help="fraction of KV removed (default 0.5)")
    f.add_argument("--tokens", type=int, default=1000, help="prompt tokens (default 1000)")
    f.add_argument("--steps", type=int, default=32, help="continuation tokens compared (default 32)")
    f.add_argument("--haystack", default="bible", help="text the prompt is taken from (default bible)")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=run_fidelity)
    q = tasks.add_parser("perplexity", help="streaming perplexity with decode-phase compression",
                         description="Perplexity of real text fed token by token while the method keeps "
                                     "the cache within --budget entries per layer and KV head.")
    add_model_options(q)
    q.add_argument("--compressors", default="none,streaming_llm,h2o,knorm",
                   help="comma-separated decode-capable methods or quantizers (kivi2, zipvl, commvq2, ...: "
                        "they take no budget and quantize the stream as their groups fill)")
    q.add_argument("--budget", type=int, default=256, help="entries kept per layer and KV head (default 256)")
    q.add_argument("--tokens", type=int, default=1024, help="text tokens scored (default 1024)")
    q.add_argument("--haystack", default="bible", help="text to score (default bible)")
    q.add_argument("--offset", type=int, default=200_000, help="character offset into the text (held out)")
    q.add_argument("--prefix", type=int, default=1,
                   help="tokens given first as a prompt, not scored (default 1); above 1 every method runs "
                        "with phase both (the prompt compressed to the budget first); fastgen needs one "
                        "(it chooses its per-head policies on it)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_perplexity)
    s = tasks.add_parser("suite", help="many methods, ratios and tasks -> results.jsonl, leaderboard.md, plots")
    _common(s)
    s.add_argument("--compressors", default="streaming_llm,knorm,snapkv,h2o,random",
                   help="comma-separated methods (the full cache always runs)")
    s.add_argument("--ratios", type=_floats, default=[0.5, 0.75, 0.875], help="default 0.5,0.75,0.875")
    s.add_argument("--tasks", default="needle", help="comma-separated tasks (default needle)")
    s.add_argument("--settings", default="agnostic", help="agnostic, aware or agnostic,aware")
    s.add_argument("--out", required=True, help="output folder")
    s.set_defaults(func=run_suite)


def _samples(args, task: str, tokenizer, limit: int):
    """Every sample of the run, generated (and validated) before any model work or output."""
    from ..evals.runner import EvalSample
    from ..evals.tasks import make_samples

    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    too_long = [n for n in args.lengths if n + args.max_new_tokens > limit]
    if too_long:
        raise InputError(f"length {too_long[0]} plus {args.max_new_tokens} answer tokens exceeds the model's "
                         f"context of {limit} tokens; use --lengths up to {limit - args.max_new_tokens}")
    from ..evals.tasks import TASKS

    needle = args.needle if TASKS[task].defaults.needle is not None else None  # vt/cwe/fwe have none
    out = []
    for length in args.lengths:
        for i, s in enumerate(make_samples(task, tokenizer, length, args.samples, seed=args.seed,
                                           haystack=args.haystack, needle=needle,
                                           question=args.question, answer_prefix=args.answer_prefix)):
            out.append(EvalSample(task=task, length=length, index=i, context=s.context, question=s.question,
                                  answers=tuple(s.answers), depth=s.depth))
    return out


def _run_label(args, task: str) -> str:
    parts = [task, args.haystack, f"seed{args.seed}", args.needle or "", args.question or "", args.answer_prefix or ""]
    return "|".join(parts)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False)


def run_task(args: argparse.Namespace) -> int:
    from ..compressors import make_compressor
    from ..compressors.quantization.base import Quantizer
    from ..evals.report import aggregate
    from ..evals.runner import MethodSpec, Runner
    from ..evals.tasks import TASKS  # noqa: F401  (validates the task name via argparse choices)

    ratio = args.ratio if args.ratio is not None or args.budget is not None else 0.5
    if args.ratio is None and isinstance(make_compressor(args.compressor), Quantizer):
        ratio = None  # a quantizer keeps every entry: no default ratio
    make_compressor(args.compressor, ratio=ratio, budget=args.budget)  # fail fast on bad settings
    engine, tokenizer = _engine(args)
    samples = _samples(args, args.task, tokenizer, engine.adapter.max_positions)
    runner = Runner(engine, args.max_new_tokens, Path(args.out) if args.out else None, _run_label(args, args.task))
    method = MethodSpec(args.compressor, None if args.budget is not None else ratio, args.budget)
    bar = _progress(len(samples) * 2, f"eval {args.task}")
    results = runner.evaluate(samples, [method], args.question_aware, on_result=lambda r: bar.update())
    bar.close()
    if args.out:  # include results of earlier (resumed) runs of the same configuration
        from ..evals.report import load_results

        rows = [r for r in load_results(Path(args.out)) if r["run"] == runner.run
                and r["question_aware"] == args.question_aware and r["length"] in args.lengths]
    else:
        import dataclasses

        rows = [dataclasses.asdict(r) for r in results]
    cells = [c for c in aggregate(rows) if c.method == method.name and c.ratio == method.ratio
             and c.budget == method.budget]
    n = sum(c.samples for c in cells) or 1
    summary = {
        "task": args.task, "compressor": args.compressor, "ratio": method.ratio, "budget": method.budget,
        "question_aware": args.question_aware,
        "score": round(sum(c.score * c.samples for c in cells) / n, 4),
        "full_score": round(sum(c.full_score * c.samples for c in cells) / n, 4),
        "results": [{"length": c.length, "samples": c.samples, "score": round(c.score, 4),
                     "full_score": round(c.full_score, 4)} for c in cells],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        setting = "question-aware" if args.question_aware else "question-agnostic"
        print(f"{args.task}, {setting}: {method.label} scores {summary['score']:.3f} "
              f"(full cache {summary['full_score']:.3f} on the same samples)")
        for c in cells:
            print(f"  {c.length:>6} tokens  {c.samples:>3} samples  score {c.score:.3f}  full {c.full_score:.3f}  "
                  f"KV kept {c.kept_fraction:.0%}")
    return 0


def run_suite(args: argparse.Namespace) -> int:
    from ..compressors import make_compressor
    from ..evals.report import write_report
    from ..evals.runner import MethodSpec, Runner
    from ..evals.tasks import TASKS

    tasks = _names(args.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; valid tasks: {', '.join(sorted(TASKS))}")
    settings = _names(args.settings)
    if not settings or any(s not in ("agnostic", "aware") for s in settings):
        raise ConfigError(f"--settings takes agnostic, aware or both, got {args.settings!r}")
    from ..compressors.quantization.base import Quantizer

    methods = []
    for n in _names(args.compressors):
        if n == "none":
            continue
        if isinstance(make_compressor(n), Quantizer):  # keeps every entry: no ratio to sweep
            methods.append(MethodSpec(n))
        else:
            methods += [MethodSpec(n, r) for r in args.ratios]
    for m in methods:
        make_compressor(m.name, ratio=m.ratio)  # fail fast on unknown names and bad ratios
    engine, tokenizer = _engine(args)
    plan = [(t, _samples(args, t, tokenizer, engine.adapter.max_positions)) for t in tasks]
    out = Path(args.out)
    results = out / "results.jsonl"
    total = sum(len(s) for _, s in plan) * len(settings) * (len(methods) + 1)
    bar = _progress(total, "eval suite")
    for task, samples in plan:
        runner = Runner(engine, args.max_new_tokens, results, _run_label(args, task))
        # both settings of a sample share its context's prefill (see evals/runner.py)
        runner.evaluate(samples, methods, tuple(s == "aware" for s in settings), on_result=lambda r: bar.update())
    bar.close()
    board, pngs = write_report(results, out, command="slimkv " + " ".join(sys.argv[1:]))
    print(f"wrote {results}, {board} and {len(pngs)} plots in {out}")
    return 0


def _text_tokens(tokenizer, haystack: str, n: int, offset: int = 0) -> list[int]:
    from ..evals.haystacks import load_haystack

    text = load_haystack(haystack)[offset:]
    ids = tokenizer.encode(text[: n * 8])
    if len(ids) < n:
        raise InputError(f"haystack {haystack!r} holds fewer than {n} tokens past offset {offset}")
    return ids[:n]


def run_fidelity(args: argparse.Namespace) -> int:
    from ..compressors import make_compressor
    from ..evals.fidelity import fidelity

    names = _names(args.compressors)
    methods = {n: make_compressor(n, ratio=args.ratio) for n in names}
    engine, tokenizer = _engine(args)
    rows = fidelity(engine, _text_tokens(tokenizer, args.haystack, args.tokens), methods, args.steps)
    if args.json:
        print(json.dumps([{**r.__dict__, "ratio": args.ratio} for r in rows]))
    else:
        for r in rows:
            print(f"{r.method:<14} ratio {args.ratio}: top-1 agreement {r.top1_agreement:.2f}, "
                  f"mean KL {r.mean_kl:.4f}, first difference at step {r.first_difference}")
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from ..compressors import make_compressor, method_info
    from ..evals.fidelity import perplexity

    def build(name: str):
        if name == "none":
            return None
        if "+" not in name and method_info(name).kind == "quantization":
            return make_compressor(name)  # every entry kept, in fewer bits: no budget applies
        if make_compressor(name, budget=args.budget, phase="prefill").decodes_per_head and args.prefix < 2:
            raise InputError(f"{name} chooses each head's policy on a prompt before it decodes: give it one "
                             "with --prefix (e.g. --prefix 512)")
        # a prefix longer than the budget is compressed first, as a generation's prompt would be
        return make_compressor(name, budget=args.budget, phase="both" if args.prefix > 1 else "decode")

    if args.prefix < 1:
        raise InputError(f"--prefix must be at least 1 token, got {args.prefix}")
    names = _names(args.compressors)
    comps = {n: build(n) for n in names}
    engine, tokenizer = _engine(args)
    tokens = _text_tokens(tokenizer, args.haystack, args.tokens + args.prefix, args.offset)
    rows = [perplexity(engine, tokens, comp, name, prefix=args.prefix) for name, comp in comps.items()]
    if args.json:
        print(json.dumps([{**r.__dict__, "budget": None if comps[r.method] is not None and comps[r.method].quantizes
                           else args.budget} for r in rows]))
    else:
        for r in rows:
            print(f"{r.method:<14} perplexity {r.perplexity:8.3f} over {r.tokens} tokens "
                  f"(at most {r.max_entries} entries per layer and KV head; "
                  f"KV {r.bytes_kept / max(r.bytes_full, 1):.3f} of a full cache at the end)")
    return 0
