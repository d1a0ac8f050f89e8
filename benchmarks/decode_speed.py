"""Decode speed and KV bytes at 512, 2k and 8k context: plain transformers vs slimkv, in one run.

Configurations (same model, same prompt, greedy, fixed number of new tokens):
  hf_generate  - transformers ``model.generate`` with its own DynamicCache (SDPA attention); decode
                 speed from the time each new token reaches a streamer
  hf_loop      - a hand-written transformers decode loop with DynamicCache (no generate() overhead)
  none         - slimkv, full cache
  snapkv@0.875 - slimkv, SnapKV keeping 1/8 of the prompt's KV entries

Each configuration is measured ``--repeats`` times and the fastest decode is kept (shared, noisy
machines). Results go to benchmarks/results/decode_speed.{json,md} with the command that made them.

    python benchmarks/decode_speed.py [--lengths 512,2048,8000] [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import slimkv
from slimkv.engine import Engine, GenerationConfig, Segments
from slimkv.evals.needle import needle_sample

RESULTS = Path(__file__).parent / "results"


class _Clock(BaseStreamer):
    """Streamer that only records when generate() hands over each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model, ids: list[int], new: int) -> dict:
    inputs = torch.tensor([ids])
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=clock)
    assert out.shape[1] - len(ids) == new
    # put() #0 is the prompt, #1 the first new token (end of prefill), #new the last one
    first, last = clock.times[1], clock.times[-1]
    kv = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * model.config.head_dim * 4
    return {"prefill_s": first - t0, "decode_tokens_per_s": (new - 1) / (last - first),
            "kv_bytes": kv * (len(ids) + new - 1)}


def hf_loop(model, ids: list[int], new: int) -> dict:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new - 1):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return {"prefill_s": prefill, "decode_tokens_per_s": (new - 1) / decode, "kv_bytes": kv}


def slim(model, tokenizer, ids: list[int], new: int, name: str, ratio: float | None) -> dict:
    engine = Engine(model, tokenizer, slimkv.make_compressor(name, ratio=ratio))
    result = engine.generate(Segments(ids, []), GenerationConfig(max_new_tokens=new, ignore_eos=True))
    assert len(result.token_ids) == new
    return {"prefill_s": result.timing.prefill_s, "decode_tokens_per_s": result.timing.decode_tokens_per_s,
            "kv_bytes": result.cache.bytes_kept, "kv_bytes_full": result.cache.bytes_full}


def read_bandwidth() -> float:
    """Bytes per second this machine reads from memory (a 256 MB reduction, best of 5)."""
    big = torch.ones(64 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    return big.numel() * 4 / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8000")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "decode_speed"))
    args = parser.parse_args()
    model, tokenizer = slimkv.load_model()
    configs = {
        "hf_generate": lambda ids: hf_generate(model, ids, args.new_tokens),
        "hf_loop": lambda ids: hf_loop(model, ids, args.new_tokens),
        "none": lambda ids: slim(model, tokenizer, ids, args.new_tokens, "none", None),
        "snapkv@0.875": lambda ids: slim(model, tokenizer, ids, args.new_tokens, "snapkv", 0.875),
    }
    bandwidth = read_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        sample = needle_sample(tokenizer, length, depth=0.5, seed=0)
        ids = tokenizer.encode(sample.context + sample.question)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, fn in configs.items():  # interleaved, so drift hits every configuration alike
                r = fn(ids)
                if name not in best or r["decode_tokens_per_s"] > best[name]["decode_tokens_per_s"]:
                    best[name] = r
        base = best["hf_generate"]["decode_tokens_per_s"]
        for name, r in best.items():
            roofline = bandwidth / (weight_bytes + r["kv_bytes"])  # tokens/s if every byte is read once
            rows.append({"context": len(ids), "config": name, **r,
                         "speedup_vs_hf_generate": r["decode_tokens_per_s"] / base,
                         "roofline_fraction": r["decode_tokens_per_s"] / roofline})
            print(f"{len(ids):>6} {name:<14} decode {r['decode_tokens_per_s']:6.2f} tok/s "
                  f"({r['decode_tokens_per_s'] / base:4.2f}x hf)  prefill {r['prefill_s']:6.2f} s  "
                  f"KV {r['kv_bytes'] / 1e6:7.1f} MB", flush=True)
    command = "python " + " ".join(sys.argv)
    meta = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or "cpu",
            "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens,
            "read_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_bytes": weight_bytes}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Decode speed ({meta['date']}, torch {meta['torch']}, {meta['threads']} threads, CPU)", "",
             f"Command: `{command}`", "",
             f"Memory read bandwidth {meta['read_bandwidth_gb_s']} GB/s; weights {weight_bytes / 1e6:.0f} MB (fp32). "
             "Roofline = decode speed if each step read every weight and KV byte once at that bandwidth.", "",
             "| context | config | decode tok/s | vs hf_generate | of roofline | prefill s | KV MB held |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['config']} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['speedup_vs_hf_generate']:.2f}x | {r['roofline_fraction']:.0%} | {r['prefill_s']:.2f} | "
                     f"{r['kv_bytes'] / 1e6:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
