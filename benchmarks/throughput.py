"""Serving throughput of the step engine under one KV budget: continuous batching, per-request compression.

Questions:
1. At the same KV memory, how many requests run at once, and how fast does a stream of requests
   finish, with the full cache, ``snapkv@0.75``, ``kivi2`` and ``snapkv+kivi2``?
2. How much does decoding several rows in one step buy over decoding one?

Workload (seeded, the same for every configuration): ``--requests`` prompts, each a slice of real
text (the essays, Bible and Shakespeare haystacks, in turn) of a length drawn uniformly in
``--min-tokens..--max-tokens``, then an instruction; ``--new-tokens`` generated per request (EOS
ignored, so every configuration generates the same tokens count); arrivals a Poisson process of
``--rate`` requests per second. The engine runs in this process with ``--kv-memory`` bytes of KV;
the configurations run one after another. Reported per configuration: output tokens per second
(generated tokens / time from the first arrival to the last token), time to first token p50/p95
(from arrival), the most requests admitted at once, the most KV bytes held (measured after every
step), and parked (preempted) requests.

Part 2: decode tokens/s of ``--batch`` rows of ``--batch-context``-token prompts against one row,
decode steps only (prompts prefilled first), ``--rounds`` rounds, median and range.

    OMP_NUM_THREADS=2 python benchmarks/throughput.py --dtype bfloat16 --kv-memory 256MiB
    python benchmarks/throughput.py --smoke --out /tmp/x        # a toy size (the test suite runs it)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import RESULTS, busy, meta, record, spread  # noqa: E402

import slimkv  # noqa: E402
from slimkv.engine import Engine, GenerationConfig, Segments  # noqa: E402
from slimkv.evals.haystacks import load_haystack  # noqa: E402
from slimkv.store.spec import parse_size  # noqa: E402

CONFIGS = {"none": ("none", None), "snapkv@0.75": ("snapkv", 0.75), "kivi2": ("kivi2", None),
           "snapkv+kivi2@0.75": ("snapkv+kivi2", 0.75)}
INSTRUCTION = "\n\nIn one paragraph, what is the passage above about?\n"


def workload(tokenizer, n: int, lo: int, hi: int, rate: float, seed: int) -> list[tuple[float, list[int]]]:
    """(arrival second, prompt ids) of ``n`` requests."""
    rng = random.Random(seed)
    chars = max(100_000, 8 * hi * (n // 3 + 1))  # enough text for distinct slices, tokenized once
    texts = [tokenizer.encode(load_haystack(h)[:chars], add_special_tokens=False)
             for h in ("essays", "bible", "shakespeare")]
    tail = tokenizer.encode(INSTRUCTION, add_special_tokens=False)
    out, at = [], 0.0
    for i in range(n):
        text = texts[i % len(texts)]
        length = rng.randint(lo, hi) - len(tail)
        start = rng.randrange(0, len(text) - length)
        out.append((at, text[start : start + length] + tail))
        at += rng.expovariate(rate)
    return out


def serve(engine: Engine, requests: list[tuple[float, list[int]]], new_tokens: int) -> dict:
    """Feed the arrivals to the engine's scheduler in real time; what the stream of requests got."""
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    scheduler = engine.scheduler
    pending, seqs, peak_rows, peak_admitted = list(requests), [], 0, 0
    start = time.perf_counter()
    while pending or not all(s.finished for s in seqs):
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            seqs.append(engine.submit(Segments(pending.pop(0)[1], []), config))
        if not scheduler.has_work():
            time.sleep(max(0.0, min(0.05, pending[0][0] - now)))
            continue
        engine.step()
        decoding = sum(not s.finished for s in scheduler.running)
        peak_rows = max(peak_rows, decoding)
        peak_admitted = max(peak_admitted, decoding + (scheduler.prefilling is not None))
    makespan = time.perf_counter() - start
    results = [s.result() for s in seqs]
    ttft = sorted(r.timing.ttft_s for r in results)
    generated = sum(len(r.token_ids) for r in results)
    return {"requests": len(results), "generated_tokens": generated, "seconds": round(makespan, 2),
            "output_tokens_per_s": round(generated / makespan, 2),
            "ttft_p50_s": round(statistics.median(ttft), 2),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 2),
            "peak_concurrent": peak_rows, "peak_admitted": peak_admitted, "peak_kv_bytes": scheduler.pool.peak, "kv_budget": scheduler.pool.budget,
            "peak_prefill_bytes": scheduler.workspace.peak, "preemptions": scheduler.preemptions,
            "scheduler": {k: round(v, 2) for k, v in vars(scheduler.stats).items()},
            "mean_kv_bytes_per_request": round(statistics.mean(r.cache_after_prefill.bytes_kept for r in results))}


def batch_scaling(engine: Engine, ids: list[int], rows: int, new_tokens: int, rounds: int) -> dict:
    """Decode tokens/s of ``rows`` rows against one row (prompts prefilled first), per round."""
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)

    def decode(n: int) -> float:
        seqs = [engine.submit(Segments(ids[i:] + ids[:i], []), config) for i in range(n)]
        while any(s.logits is None and not s.finished for s in seqs):
            engine.step()
        t0, before = time.perf_counter(), sum(len(s.ids) for s in seqs)
        while not all(s.finished for s in seqs):
            engine.step()
        return (sum(len(s.ids) for s in seqs) - before) / (time.perf_counter() - t0)

    one, many, ratio = [], [], []
    for _ in range(rounds):
        a, b = decode(1), decode(rows)
        one.append(a), many.append(b), ratio.append(b / a)
    return {"rows": rows, "context": len(ids), "one_row_tokens_per_s": spread(one),
            "batch_tokens_per_s": spread(many), "speedup": spread(ratio)}


def markdown(args, runs: dict, scaling: dict) -> str:
    none = runs.get("none")
    lines = [
        "# Serving throughput: continuous batching over one KV budget",
        "",
        f"{args.requests} requests, prompts of {args.min_tokens}-{args.max_tokens} tokens of real text (essays, "
        f"Bible, Shakespeare), {args.new_tokens} new tokens each, Poisson arrivals at {args.rate}/s; "
        f"KV pool {args.kv_memory} (what decoding requests hold, after their compressor) plus one prefill "
        "workspace (the request being prefilled, uncompressed); one process, configurations in turn. "
        "Concurrent: the most requests decoding in one step (their KV in the pool); admitted adds the one "
        "in the prefill workspace.",
        "",
        "| configuration | output tok/s | vs full | TTFT p50 s | TTFT p95 s | peak concurrent | vs full "
        "| peak admitted | peak pool MiB | peak prefill MiB | KV MiB / request | parked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        speed = r["output_tokens_per_s"] / none["output_tokens_per_s"] if none else float("nan")
        rows = r["peak_concurrent"] / none["peak_concurrent"] if none else float("nan")
        lines.append(f"| {name} | {r['output_tokens_per_s']:.1f} | {speed:.2f}x | {r['ttft_p50_s']:.1f} | "
                     f"{r['ttft_p95_s']:.1f} | {r['peak_concurrent']} | {rows:.2f}x | {r['peak_admitted']} | "
                     f"{r['peak_kv_bytes'] / 2**20:.0f} | {r['peak_prefill_bytes'] / 2**20:.0f} | "
                     f"{r['mean_kv_bytes_per_request'] / 2**20:.1f} | "
                     f"{r['preemptions']} |")
    s = scaling
    lines += [
        "",
        f"## Batch decoding: {s['rows']} rows of {s['context']}-token prompts against one row",
        "",
        "| | median | min | max |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {s[key]['median']:.2f} | {s[key]['min']:.2f} | {s[key]['max']:.2f} |"
          for label, key in (("one row, decode tok/s", "one_row_tokens_per_s"),
                             (f"{s['rows']} rows, decode tok/s", "batch_tokens_per_s"),
                             ("speedup (same round)", "speedup"))),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=slimkv.DEFAULT_MODEL)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=4000)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second (Poisson)")
    p.add_argument("--kv-memory", default="256MiB", help="the engine's KV budget, e.g. 256MiB")
    p.add_argument("--step-tokens", type=int, default=512, help="prompt tokens prefilled per step while decoding")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-context", type=int, default=512)
    p.add_argument("--batch-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a toy size that checks the script runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="throughput", help="results file name (results/<name>.{json,md})")
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.min_tokens, args.max_tokens, args.new_tokens = 4, 64, 160, 6
        args.rate, args.kv_memory, args.batch, args.batch_context, args.batch_new_tokens = 50.0, "64MiB", 2, 48, 4
        args.rounds = 1
        args.configs = "none,snapkv@0.75"
    if busy() > 0.3:
        print(f"warning: the machine is busy (load {busy():.2f} per core); figures will be low", file=sys.stderr)
    torch.set_grad_enabled(False)
    model, tokenizer = slimkv.load_model(args.model, dtype=args.dtype)
    budget = parse_size(args.kv_memory)
    requests = workload(tokenizer, args.requests, args.min_tokens, args.max_tokens, args.rate, args.seed)
    runs = {}
    for name in args.configs.split(","):
        method, ratio = CONFIGS[name]
        comp = None if method == "none" else slimkv.make_compressor(method, ratio=ratio)
        engine = Engine(model, tokenizer, comp, kv_memory=budget, step_tokens=args.step_tokens)
        engine.bind(comp)  # calibrations (kivi2's wide-key layers) before the clock starts
        runs[name] = serve(engine, requests, args.new_tokens)
        print(name, runs[name], file=sys.stderr)
    engine = Engine(model, tokenizer, kv_memory=1 << 34)
    ids = requests[0][1][: args.batch_context]
    scaling = batch_scaling(engine, ids, args.batch, args.batch_new_tokens, args.rounds)
    print("batch", scaling, file=sys.stderr)
    data = {"runs": runs, "batch_scaling": scaling,
            "meta": meta(str(next(model.parameters()).dtype).removeprefix("torch."), workload_seed=args.seed)}
    return record(args.name, data, markdown(args, runs, scaling), args.out)


if __name__ == "__main__":
    print(main())
