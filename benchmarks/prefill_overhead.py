"""Prefill overhead of every eviction method against the full cache, measured in one run.

For each registered eviction and merging method (at ``--ratio``; a method may carry parameters,
``h2o:query_stride=1``) and the full cache (``none``), the time to turn a
prompt into a ready cache - prefill with the method observing, then its compression - is measured
``--rounds`` times. Rounds are interleaved (every configuration once per round, in an order rotated
each round), so drift in the machine's load hits every configuration alike; the median per
configuration is reported, as a ratio to ``none``'s median. The issue's floor: every method within
1.15x of ``none`` at 4k tokens.

Results go to ``benchmarks/results/prefill_overhead.{json,md}`` with the command and the machine
load (1-minute load average before and after the run).

    OMP_NUM_THREADS=1 python benchmarks/prefill_overhead.py [--length 4000] [--ratio 0.75] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import slimkv
from slimkv import compressors
from slimkv.engine import Engine, Segments
from slimkv.evals.tasks import make_samples

RESULTS = Path(__file__).parent / "results"
FLOOR = 1.15


def measure(engine: Engine, ids: list[int]) -> tuple[float, float]:
    """(seconds to prefill and compress ``ids``, of which compression) with the engine's compressor."""
    t0 = time.perf_counter()
    with engine.adapter.attached():
        cache = engine.new_cache()
        engine.prefill(cache, ids)
        t1 = time.perf_counter()
        comp = engine.compressor
        if comp is not None and comp.active("prefill"):
            engine.compress(cache, "prefill")
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000, help="prompt tokens (default 4000)")
    parser.add_argument("--ratio", type=float, default=0.75, help="fraction of KV removed (default 0.75)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods, each `name` or `name:param=value:...` "
                             "(default: every eviction and merging method)")
    parser.add_argument("--haystack", default="bible", help="prompt text (default bible)")
    parser.add_argument("--out", default=str(RESULTS / "prefill_overhead"))
    args = parser.parse_args()
    names = args.methods.split(",") if args.methods else [
        n for n in compressors.names() if compressors.method_info(n).kind in ("eviction", "merging") and n != "none"]
    load_before = os.getloadavg()[0]
    model, tokenizer = slimkv.load_model()
    sample = make_samples("needle", tokenizer, args.length, 1, haystack=args.haystack)[0]
    ids = tokenizer.encode(sample.context + sample.question)
    configs = {"none": Engine(model, tokenizer)}
    for name in names:
        method, *params = name.split(":")
        configs[name] = Engine(model, tokenizer, compressors.make_compressor(
            method, ratio=args.ratio, **{k: _number(v) for k, v in (p.split("=") for p in params)}))
    measure(configs["none"], ids)  # warm-up: allocator, kernels, lazy imports
    times: dict[str, list[float]] = {n: [] for n in configs}
    compress: dict[str, list[float]] = {n: [] for n in configs}
    order = list(configs)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            total, part = measure(configs[name], ids)
            times[name].append(total)
            compress[name].append(part)
        print(f"round {r + 1}/{args.rounds}: " + " ".join(f"{n} {times[n][-1]:.2f}s" for n in order),
              file=sys.stderr, flush=True)
    base = statistics.median(times["none"])
    rows = []
    for name in order:
        med = statistics.median(times[name])
        rows.append({"method": name, "median_s": round(med, 3), "compress_s": round(statistics.median(compress[name]), 3),
                     "ratio_to_none": round(med / base, 3), "times_s": [round(t, 3) for t in times[name]],
                     "within_floor": med / base <= FLOOR,
                     "needs_key_mass": bool(getattr(configs[name].compressor, "needs_key_mass", False))})
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(sys.argv)
    meta = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "prompt_tokens": len(ids), "ratio": args.ratio, "rounds": args.rounds,
            "load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Prefill overhead ({meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s), "
             f"{meta['cpus']} CPUs, fp32)", "",
             f"Command: `{command}`", "",
             f"{len(ids)} prompt tokens (needle sample, {args.haystack} haystack), ratio {args.ratio}, "
             f"{args.rounds} interleaved rounds, median per method. Time = prefill with the method observing "
             f"+ its compression. Machine load (1-min average) {meta['load_avg_1min_before']} before, "
             f"{meta['load_avg_1min_after']} after: the machine is shared, so compare ratios, not seconds.", "",
             f"| method | median s | of which compress s | vs none | within {FLOOR}x |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['median_s']:.2f} | {r['compress_s']:.3f} | {r['ratio_to_none']:.2f}x | "
                     f"{'yes' if r['within_floor'] else 'NO'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    for line in lines[-len(rows):]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
