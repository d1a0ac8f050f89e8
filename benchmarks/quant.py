"""KIVI quantization on the embedded model: bits per element, needle score, decode speed, in one run.

1. Effective bits per stored element at ~4k tokens, for kivi8/kivi4/kivi2, zipvl, snapkv@0.5+kivi2, minikv@0.5:
   ``bytes_kept * 8 / (entries * 2 * head_dim)`` where ``entries`` is the number of (token, layer, KV
   head) entries held and ``bytes_kept`` every byte the cache allocates (packed codes, float16 scales
   and zero points, positions, lengths, the full-precision residual). A 16-bit cache of the same
   entries would be 16 bits (plus its positions); the full cache of the embedded model is float32.
   Measured right after the prompt is compressed, and again after decoding ``--new-tokens`` tokens
   (decoded tokens wait in full precision until a group of them fills).
2. Needle retrieval at 1k and 2k tokens (the evaluation runner: one prefill per sample, every
   method on the same samples, the full cache included), question-agnostic and question-aware.
3. Decode speed at ~8k tokens: one prefill, a clone per configuration, configurations interleaved
   ``--repeats`` times and the fastest kept; every quantization mode, kivi2 also through the PyTorch
   path (kernel disabled).

    python benchmarks/quant.py [--samples 5] [--new-tokens 32] [--repeats 2] [--threads 1]

Results go to benchmarks/results/quant.{json,md} with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import slimkv
from slimkv.cache import kernels
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.evals.needle import needle_sample
from slimkv.evals.runner import EvalSample, MethodSpec, Runner
from slimkv.evals.tasks import make_samples

RESULTS = Path(__file__).parent / "results"
BITS_MODES = [("none", None), ("kivi8", None), ("kivi4", None), ("kivi2", None), ("zipvl", None),
              ("snapkv+kivi2", 0.5), ("minikv", 0.5)]
NEEDLE_METHODS = [MethodSpec("kivi8"), MethodSpec("kivi4"), MethodSpec("kivi2"), MethodSpec("zipvl"),
                  MethodSpec("snapkv", ratio=0.5), MethodSpec("snapkv+kivi2", ratio=0.5), MethodSpec("minikv", ratio=0.5)]
SPEED_MODES = ["none", "kivi8", "kivi4", "kivi2", "kivi2 (PyTorch path)", "zipvl", "commvq2", "commvq1"]


def label(name: str, ratio: float | None) -> str:
    return name if ratio is None else f"{name}@{ratio}"


def element_bits(cache, spec) -> dict:
    entries = sum(layer.entries() for layer in cache.layers)  # (token, layer, kv head) entries
    stats = cache.stats()
    elements = entries * 2 * spec.head_dim
    return {"entries_per_head": stats.tokens_kept, "bytes_kept": stats.bytes_kept,
            "bytes_full": stats.bytes_full, "bits_per_element": stats.bytes_kept * 8 / elements,
            "vs_16bit_same_entries": stats.bytes_kept / (elements * 2),
            "vs_full_cache": stats.bytes_kept / stats.bytes_full}


def bits_section(model, tokenizer, length: int, new_tokens: int) -> list[dict]:
    sample = needle_sample(tokenizer, length, depth=0.5, seed=0)
    segments = Segments(tokenizer.encode(sample.context + sample.question), [])
    comps = {m: (slimkv.make_compressor(m[0], ratio=m[1]) if m[0] != "none" else None) for m in BITS_MODES}
    engine = Engine(model, tokenizer)
    with engine.adapter.attached():
        base = engine.new_cache()
        logits = engine.prefill(base, segments.context, observers=tuple(c for c in comps.values() if c))
    rows = []
    for (name, ratio), comp in comps.items():
        runner = engine.with_compressor(comp)
        cache = base.clone()
        if comp is not None:
            with engine.adapter.attached():
                runner.compress(cache, "prefill")
        after_prefill = element_bits(cache, engine.adapter.spec)
        runner.continue_from(cache, logits, segments, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
        after_decode = element_bits(cache, engine.adapter.spec)
        rows.append({"mode": label(name, ratio), "prompt_tokens": segments.total, "after_prefill": after_prefill,
                     "after_decode": after_decode, "decoded": new_tokens})
        print(f"bits {label(name, ratio):<18} {after_prefill['bits_per_element']:6.3f} after prefill, "
              f"{after_decode['bits_per_element']:6.3f} after {new_tokens} decoded", flush=True)
    return rows


def needle_section(model, tokenizer, lengths: list[int], samples: int) -> list[dict]:
    engine = Engine(model, tokenizer)
    runner = Runner(engine, max_new_tokens=16)
    evals = []
    for length in lengths:
        for i, s in enumerate(make_samples("needle", tokenizer, length, samples, seed=0)):
            evals.append(EvalSample(task="needle", length=length, index=i, context=s.context,
                                    question=s.question, answers=tuple(s.answers), depth=s.depth))
    rows = []
    for aware in (False, True):
        for r in runner.evaluate(evals, NEEDLE_METHODS, question_aware=aware):
            rows.append({"setting": "aware" if aware else "agnostic", "length": r.length, "index": r.index,
                         "method": label(r.method, r.ratio), "score": r.score, "answer": r.answer,
                         "bytes_kept": r.bytes_kept, "bytes_full": r.bytes_full})
            print(f"needle {rows[-1]['setting']:<8} {r.length:>5} #{r.index} {rows[-1]['method']:<18} "
                  f"{r.score:.0f} {r.answer!r}", flush=True)
    return rows


def speed_section(model, tokenizer, length: int, new_tokens: int, repeats: int) -> list[dict]:
    sample = needle_sample(tokenizer, length, depth=0.5, seed=0)
    segments = Segments(tokenizer.encode(sample.context + sample.question), [])
    engine = Engine(model, tokenizer)
    comps = {name: slimkv.make_compressor(name) for name in {m.split()[0] for m in SPEED_MODES} - {"none"}}
    runners = {name: engine.with_compressor(comp) for name, comp in comps.items()}  # (binds them)
    runners["none"] = engine
    t0 = time.perf_counter()
    with engine.adapter.attached():  # one prefill observed by every mode (zipvl needs its window's queries)
        base = engine.new_cache()
        logits = engine.prefill(base, segments.context, observers=tuple(comps.values()))
    print(f"speed: prefilled {segments.total} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    best: dict[str, dict] = {}
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    for _ in range(repeats):
        for mode in SPEED_MODES:  # interleaved, so drift hits every configuration alike
            name = mode.split()[0]
            runner = runners[name]
            cache = base.clone()
            with engine.adapter.attached():
                if name != "none":
                    runner.compress(cache, "prefill")
            if "PyTorch" in mode:
                with kernels.disabled():
                    result = runner.continue_from(cache, logits, segments, config)
            else:
                result = runner.continue_from(cache, logits, segments, config)
            tps = result.timing.decode_tokens_per_s
            print(f"speed {mode:<22} {tps:6.2f} tok/s  KV {result.cache.bytes_kept / 1e6:7.1f} MB "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            if mode not in best or tps > best[mode]["decode_tokens_per_s"]:
                best[mode] = {"mode": mode, "context": segments.total, "decode_tokens_per_s": tps,
                              "kv_bytes": result.cache.bytes_kept, "text": result.text[:60]}
    full = best["none"]["decode_tokens_per_s"]
    return [{**r, "vs_full_cache": r["decode_tokens_per_s"] / full} for r in best.values()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits-length", type=int, default=4096)
    parser.add_argument("--needle-lengths", default="1000,2000")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--speed-length", type=int, default=8000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sections", default="bits,needle,speed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on the shared 2-core machine two threads of two "
                             "busy processes stall each other at every parallel region, up to 20x)")
    parser.add_argument("--out", default=str(RESULTS / "quant"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = slimkv.load_model()
    sections = args.sections.split(",")
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    data = {k: previous.get(k, []) for k in ("bits", "needle", "speed")}
    load = [os.getloadavg()[0]]
    if "bits" in sections:
        data["bits"] = bits_section(model, tokenizer, args.bits_length, args.new_tokens)
    if "needle" in sections:
        data["needle"] = needle_section(model, tokenizer, [int(x) for x in args.needle_lengths.split(",")],
                                        args.samples)
    if "speed" in sections:
        data["speed"] = speed_section(model, tokenizer, args.speed_length, args.new_tokens, args.repeats)
    load.append(os.getloadavg()[0])
    command = "python " + " ".join(sys.argv)
    meta = dict(previous.get("meta", {}))
    meta.update({"command_" + "+".join(sections): command, "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.machine(),
                 "date": time.strftime("%Y-%m-%d"), "load_avg_" + "+".join(sections): load,
                 "kernel": kernels.compiled(), "new_tokens": args.new_tokens})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **data}, indent=1))
    out.with_suffix(".md").write_text(report(meta, data))
    return 0


def report(meta: dict, data: dict) -> str:
    commands = [f"`{v}`" for k, v in meta.items() if k.startswith("command")]
    lines = [f"# KIVI quantization ({meta['date']}, torch {meta['torch']}, torch threads: {meta['threads']}, CPU, "
             "embedded SmolLM2-135M)", "", "Commands: " + "; ".join(commands), "",
             "Shared 2-core machine; 1-minute load average at start and end of each part: "
             + "; ".join(f"{k[9:]} {', '.join(f'{x:.1f}' for x in v)}" for k, v in meta.items()
                         if k.startswith("load_avg")), ""]
    if data["bits"]:
        lines += ["## Effective bits per stored element", "",
                  "bits = every allocated byte x 8 / (entries x 2 x head_dim); 16-bit = bytes over a 16-bit cache "
                  "of the same entries; full = bytes over the float32 full cache of all tokens.", "",
                  "| mode | prompt tokens | entries/head | bits after prefill | vs 16-bit | vs full | "
                  f"bits after {meta['new_tokens']} decoded |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in data["bits"]:
            a, b = r["after_prefill"], r["after_decode"]
            lines.append(f"| {r['mode']} | {r['prompt_tokens']} | {a['entries_per_head']} | "
                         f"{a['bits_per_element']:.3f} | {a['vs_16bit_same_entries']:.3f} | "
                         f"{a['vs_full_cache']:.3f} | {b['bits_per_element']:.3f} |")
        lines.append("")
    if data["needle"]:
        lines += ["## Needle retrieval (string match, same samples for every method)", ""]
        for setting in ("agnostic", "aware"):
            rows = [r for r in data["needle"] if r["setting"] == setting]
            lengths = sorted({r["length"] for r in rows})
            methods = list(dict.fromkeys(r["method"] for r in rows))
            lines += [f"question-{setting}:", "", "| method | " + " | ".join(f"{n} tok" for n in lengths)
                      + " | KV vs full |", "|---|" + "---:|" * (len(lengths) + 1)]
            for m in methods:
                cells = []
                for n in lengths:
                    s = [r["score"] for r in rows if r["method"] == m and r["length"] == n]
                    cells.append(f"{sum(s) / len(s):.2f} ({len(s)})")
                kv = [r["bytes_kept"] / r["bytes_full"] for r in rows if r["method"] == m]
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {sum(kv) / len(kv):.3f} |")
            lines.append("")
    if data["speed"]:
        lines += ["## Decode speed (best of the interleaved repeats)", "",
                  "| mode | context | decode tok/s | vs full cache | KV MB held |", "|---|---:|---:|---:|---:|"]
        for r in data["speed"]:
            lines.append(f"| {r['mode']} | {r['context']} | {r['decode_tokens_per_s']:.2f} | "
                         f"{r['vs_full_cache']:.2f}x | {r['kv_bytes'] / 1e6:.1f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
