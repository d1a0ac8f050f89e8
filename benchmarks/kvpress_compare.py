"""slimkv next to NVIDIA kvpress: same model, same samples (identical token ids), same ratios.

1. writes the samples (context and question token ids) to ``OUT/samples.jsonl``;
2. runs ``benchmarks/kvpress/run_kvpress.py`` in kvpress's own virtual environment (kvpress needs
   transformers < 5.3; create it with ``benchmarks/kvpress/setup.sh``) -> ``OUT/kvpress.jsonl``;
3. runs slimkv's evaluation runner on the same samples -> ``OUT/slimkv.jsonl``;
4. scores both with the same string match (answers cut at the first newline, as slimkv's runner
   does) and writes ``OUT/comparison.md`` and ``OUT/comparison.json``: method x ratio, kvpress's score
   beside slimkv's, and seconds per sample and configuration for each.

Both sides are resumable (interrupted runs pick up where they stopped). Seconds: kvpress prefills
once per configuration (its presses act inside the prefill); slimkv prefills once per sample and
shares it across every configuration, so its seconds include a share of that prefill.

    benchmarks/kvpress/setup.sh
    OMP_NUM_THREADS=1 python benchmarks/kvpress_compare.py --lengths 1000,2000 --samples 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import slimkv
from slimkv.compressors import names as registered
from slimkv.engine import Engine
from slimkv.evals.runner import EvalSample, MethodSpec, Runner
from slimkv.evals.scoring import string_match
from slimkv.evals.tasks import make_samples
from slimkv.models.embedded import converted_folder

ROOT = Path(__file__).resolve().parent.parent
METHODS = "streaming_llm,snapkv,knorm,h2o,pyramidkv,expected_attention"


def write_samples(tokenizer, args, path: Path) -> list[EvalSample]:
    samples, lines = [], []
    for length in args.lengths:
        for i, s in enumerate(make_samples(args.task, tokenizer, length, args.samples, seed=args.seed,
                                           haystack=args.haystack)):
            samples.append(EvalSample(args.task, length, i, s.context, s.question, tuple(s.answers), s.depth))
            lines.append(json.dumps({
                "task": args.task, "length": length, "index": i, "answers": list(s.answers),
                "context_ids": tokenizer.encode(s.context),
                "question_ids": tokenizer.encode(s.question, add_special_tokens=False),
            }))
    path.write_text("\n".join(lines) + "\n")
    return samples


def run_kvpress(args, model_dir: Path, samples: Path, out: Path) -> None:
    python = ROOT / args.kvpress_venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"kvpress environment not found at {python}; create it with benchmarks/kvpress/setup.sh")
    cmd = [str(python), str(ROOT / "benchmarks/kvpress/run_kvpress.py"), str(model_dir), str(samples), str(out),
           "--methods", ",".join(args.methods), "--ratios", ",".join(map(str, args.ratios)),
           "--settings", args.settings, "--max-new-tokens", str(args.max_new_tokens)]
    subprocess.run(cmd, check=True, env=dict(os.environ))


def table(kv_rows: list[dict], sk_rows: list[dict], settings: list[bool], methods: list[str],
          ratios: list[float], command: str) -> tuple[str, list[dict]]:
    cells: dict[tuple, dict] = defaultdict(lambda: {"kvpress": [], "slimkv": [], "kvpress_s": [], "slimkv_s": []})
    for r in kv_rows:
        cells[(r["method"], r["ratio"], r["question_aware"])]["kvpress"].append(r["score"])
        cells[(r["method"], r["ratio"], r["question_aware"])]["kvpress_s"].append(r["seconds"])
    for r in sk_rows:
        cells[(r["method"], r["ratio"], r["question_aware"])]["slimkv"].append(r["score"])
        cells[(r["method"], r["ratio"], r["question_aware"])]["slimkv_s"].append(r["seconds"])

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    out, data = ["# slimkv vs kvpress", "", f"Command: `{command}`", ""], []
    for aware in settings:
        out += [f"## {'question-aware' if aware else 'question-agnostic'}", "",
                "| method | ratio | kvpress score | slimkv score | kvpress s/sample | slimkv s/sample | samples |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for method, ratio in [("none", None)] + [(m, r) for m in methods for r in ratios]:
            c = cells[(method, ratio, aware)]
            row = {"method": method, "ratio": ratio, "question_aware": aware,
                   "kvpress_score": mean(c["kvpress"]), "slimkv_score": mean(c["slimkv"]),
                   "kvpress_seconds": mean(c["kvpress_s"]), "slimkv_seconds": mean(c["slimkv_s"]),
                   "samples": max(len(c["kvpress"]), len(c["slimkv"]))}
            data.append(row)
            out.append(f"| {'none (full cache)' if method == 'none' else method} | {ratio if ratio else '-'} | "
                       f"{fmt(row['kvpress_score'], '.2f')} | {fmt(row['slimkv_score'], '.2f')} | "
                       f"{fmt(row['kvpress_seconds'], '.1f')} | {fmt(row['slimkv_seconds'], '.1f')} | {row['samples']} |")
        out.append("")
    return "\n".join(out), data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="needle")
    p.add_argument("--lengths", default="1000,2000")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default="noise")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--ratios", default="0.5,0.75,0.875")
    p.add_argument("--settings", default="agnostic,aware")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--kvpress-venv", default=".venv-kvpress")
    p.add_argument("--skip-kvpress", action="store_true", help="only (re)score and (re)write the table")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/kvpress"))
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    settings = [s == "aware" for s in args.settings.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = slimkv.load_model()
    samples = write_samples(tokenizer, args, out / "samples.jsonl")
    if not args.skip_kvpress:
        run_kvpress(args, converted_folder(), out / "samples.jsonl", out / "kvpress.jsonl")

    ours = [m for m in args.methods if m in registered()]
    runner = Runner(Engine(model, tokenizer), args.max_new_tokens, out / "slimkv.jsonl", run=f"{args.task}|{args.haystack}|seed{args.seed}")
    runner.evaluate(samples, [MethodSpec(m, r) for m in ours for r in args.ratios], settings)

    answers = {(s.length, s.index): s.answers for s in samples}
    keep = {(s.length, s.index) for s in samples}
    kv_rows = []
    for line in (out / "kvpress.jsonl").read_text().splitlines():
        r = json.loads(line)
        if (r["length"], r["index"]) not in keep or r["task"] != args.task:
            continue
        text = tokenizer.decode(r["answer_ids"], skip_special_tokens=True).split("\n")[0]
        kv_rows.append({**r, "answer": text, "score": string_match(text, answers[(r["length"], r["index"])])})
    sk_rows = [json.loads(line) for line in (out / "slimkv.jsonl").read_text().splitlines()]
    sk_rows = [r for r in sk_rows if (r["length"], r["index"]) in keep and r["run"] == runner.run]
    command = "OMP_NUM_THREADS=1 python benchmarks/kvpress_compare.py " + " ".join(sys.argv[1:])
    text, data = table(kv_rows, sk_rows, settings, args.methods, args.ratios, command)
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps({"command": command, "task": args.task,
                                                     "lengths": args.lengths, "rows": data}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
