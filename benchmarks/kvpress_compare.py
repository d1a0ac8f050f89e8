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
    OMP_NUM_THREADS=1 python benchmarks/kvpress_compare.py --tasks needle,multikey --lengths 1000,2000,4000 --samples 5
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
METHODS = "streaming_llm,snapkv,knorm,h2o,pyramidkv,expected_attention,keydiff,adasnapkv"


def write_samples(tokenizer, args, path: Path) -> list[EvalSample]:
    samples, lines = [], []
    for task in args.tasks:
        for length in args.lengths:
            for i, s in enumerate(make_samples(task, tokenizer, length, args.samples, seed=args.seed,
                                               haystack=args.haystack)):
                samples.append(EvalSample(task, length, i, s.context, s.question, tuple(s.answers), s.depth))
                lines.append(json.dumps({
                    "task": task, "length": length, "index": i, "answers": list(s.answers),
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


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(kv_rows: list[dict], sk_rows: list[dict], tasks: list[str], lengths: list[int], settings: list[bool],
          methods: list[str], ratios: list[float], command: str) -> tuple[str, list[dict]]:
    """One table per task and setting: method x ratio, both libraries' scores per length and on average,
    the share of the full cache's bytes each holds after the prefill, and seconds per sample."""
    cells: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    full_bytes = {(r["task"], r["length"], r["index"], r["question_aware"]): r.get("cache_bytes")
                  for r in kv_rows if r["method"] == "none"}
    for r in kv_rows:
        c = cells[(r["task"], r["method"], r["ratio"], r["question_aware"])]
        c[("kvpress", r["length"])].append(r["score"])
        c["kvpress_s"].append(r["seconds"])
        full = full_bytes.get((r["task"], r["length"], r["index"], r["question_aware"]))
        if r.get("cache_bytes") and full:
            c["kvpress_kv"].append(r["cache_bytes"] / full)
    # paired: a slimkv answer counts only where kvpress answered the same sample, method and ratio
    answered = {(r["task"], r["length"], r["index"], r["method"], r["ratio"], r["question_aware"]) for r in kv_rows}
    for r in sk_rows:
        if (r["task"], r["length"], r["index"], r["method"], r["ratio"], r["question_aware"]) not in answered:
            continue
        c = cells[(r["task"], r["method"], r["ratio"], r["question_aware"])]
        c[("slimkv", r["length"])].append(r["score"])
        c["slimkv_s"].append(r["seconds"])
        c["slimkv_kv"].append(r["bytes_kept"] / r["bytes_full"])

    data: list[dict] = []
    out = ["# slimkv vs kvpress", "", f"Command: `{command}`", "",
           ("Scores: fraction of the expected strings found in the answer, per prompt length, on identical "
            "samples (token ids); a cell counts only the samples both libraries answered. KV: bytes held "
            "after the compressed prefill as a share of the full cache's key and value bytes (slimkv counts "
            "its position ids and free slots too). Seconds: per sample and configuration."), ""]
    head = "| method | ratio | " + " | ".join(f"{n} kvpress | {n} slimkv" for n in lengths) + \
        " | mean kvpress | mean slimkv | KV kvpress | KV slimkv | s kvpress | s slimkv | samples |"
    rule = "|---|---:|" + "---:|---:|" * len(lengths) + "---:|---:|---:|---:|---:|---:|---:|"
    for task in tasks:
        for aware in settings:
            out += [f"## {task}, {'question-aware' if aware else 'question-agnostic'}", "", head, rule]
            for method, ratio in [("none", None)] + [(m, r) for m in methods for r in ratios]:
                c = cells[(task, method, ratio, aware)]
                kv_all = [x for n in lengths for x in c[("kvpress", n)]]
                sk_all = [x for n in lengths for x in c[("slimkv", n)]]
                row = {"task": task, "method": method, "ratio": ratio, "question_aware": aware,
                       "kvpress_score": _mean(kv_all), "slimkv_score": _mean(sk_all),
                       "kvpress_by_length": {n: _mean(c[("kvpress", n)]) for n in lengths},
                       "slimkv_by_length": {n: _mean(c[("slimkv", n)]) for n in lengths},
                       "kvpress_kv": _mean(c["kvpress_kv"]), "slimkv_kv": _mean(c["slimkv_kv"]),
                       "kvpress_seconds": _mean(c["kvpress_s"]), "slimkv_seconds": _mean(c["slimkv_s"]),
                       "samples": max(len(kv_all), len(sk_all))}
                data.append(row)
                per_length = " | ".join(f"{_fmt(row['kvpress_by_length'][n], '.2f')} | "
                                        f"{_fmt(row['slimkv_by_length'][n], '.2f')}" for n in lengths)
                out.append(f"| {'none (full cache)' if method == 'none' else method} | {ratio if ratio else '-'} | "
                           f"{per_length} | {_fmt(row['kvpress_score'], '.2f')} | {_fmt(row['slimkv_score'], '.2f')} | "
                           f"{_fmt(row['kvpress_kv'], '.2f')} | {_fmt(row['slimkv_kv'], '.2f')} | "
                           f"{_fmt(row['kvpress_seconds'], '.1f')} | {_fmt(row['slimkv_seconds'], '.1f')} | "
                           f"{row['samples']} |")
            out.append("")
    return "\n".join(out), data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="needle", help="comma-separated tasks (needle, multikey, ...)")
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
    args.tasks = [t for t in args.tasks.split(",") if t]
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

    ours = [MethodSpec(m, r) for m in args.methods if m in registered() for r in args.ratios]
    runs = {}
    for task in args.tasks:
        runs[task] = f"{task}|{args.haystack}|seed{args.seed}"
        runner = Runner(Engine(model, tokenizer), args.max_new_tokens, out / "slimkv.jsonl", run=runs[task])
        runner.evaluate([s for s in samples if s.task == task], ours, settings)

    answers = {(s.task, s.length, s.index): s.answers for s in samples}
    kv_rows = []
    for line in (out / "kvpress.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = (r["task"], r["length"], r["index"])
        if key not in answers or r["method"] not in args.methods + ["none"] or \
                (r["ratio"] is not None and r["ratio"] not in args.ratios):
            continue
        text = tokenizer.decode(r["answer_ids"], skip_special_tokens=True).split("\n")[0]
        kv_rows.append({**r, "answer": text, "score": string_match(text, answers[key])})
    sk_rows = [json.loads(line) for line in (out / "slimkv.jsonl").read_text().splitlines()]
    sk_rows = [r for r in sk_rows if (r["task"], r["length"], r["index"]) in answers and r["run"] == runs.get(r["task"])]
    command = "OMP_NUM_THREADS=1 python benchmarks/kvpress_compare.py " + " ".join(sys.argv[1:])
    text, data = table(kv_rows, sk_rows, args.tasks, args.lengths, settings, args.methods, args.ratios, command)
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps({"command": command, "tasks": args.tasks,
                                                     "lengths": args.lengths, "rows": data}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
