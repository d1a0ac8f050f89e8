"""Decode speed over paged (ragged) layers against the same entries stored dense, in one run.

One needle prompt, compressed with a head-wise method (adasnapkv by default); the same compressed
cache is decoded greedily twice: as slimkv holds it (paged layers, each attention gathers a temporary
padded view of its layer) and converted to dense padded layers. Runs alternate, the fastest of
``--repeats`` is kept (shared, noisy machine); compare the two as a ratio, not as absolute speeds.

    python benchmarks/ragged_decode.py [--length 2000] [--ratio 0.875] [--new-tokens 32] [--repeats 3]

Results go to benchmarks/results/ragged_decode.{json,md} with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import slimkv
from slimkv.cache import RaggedLayer
from slimkv.engine import Engine, Segments
from slimkv.evals.needle import needle_sample

RESULTS = Path(__file__).parent / "results"


def decode(engine: Engine, cache, last: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Seconds for ``steps`` greedy tokens from a copy of ``cache``, and the tokens."""
    cache = cache.clone()
    token, tokens = int(last.argmax(-1)), []
    runner = engine.runner
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = runner.forward([runner.row(cache, [token], None, "decode")])[:, -1]
        token = int(logits.argmax(-1))
        tokens.append(token)
    return time.perf_counter() - t0, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="adasnapkv")
    p.add_argument("--length", type=int, default=2000)
    p.add_argument("--ratio", type=float, default=0.875)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = slimkv.load_model()
    engine = Engine(model, tokenizer, slimkv.make_compressor(args.method, ratio=args.ratio))
    sample = needle_sample(tokenizer, args.length, depth=0.5, seed=0)
    segments = Segments(tokenizer.encode(sample.context + sample.question), [])
    with engine.adapter.attached():
        paged, last = engine.prepare(segments)
        dense = paged.clone()
        dense.layers = [layer.to_dense() if isinstance(layer, RaggedLayer) else layer for layer in dense.layers]
        best = {"paged": float("inf"), "dense": float("inf")}
        outputs = {}
        for _ in range(args.repeats):
            for name, cache in (("paged", paged), ("dense", dense)):
                seconds, outputs[name] = decode(engine, cache, last, args.new_tokens)
                best[name] = min(best[name], seconds)
    row = dict(
        method=args.method, ratio=args.ratio, prompt_tokens=len(segments.context), new_tokens=args.new_tokens,
        ragged_layers=sum(isinstance(layer, RaggedLayer) for layer in paged.layers),
        kv_bytes_paged=paged.stats().bytes_kept, kv_bytes_dense=dense.stats().bytes_kept,
        tokens_per_s_paged=round(args.new_tokens / best["paged"], 2),
        tokens_per_s_dense=round(args.new_tokens / best["dense"], 2),
        same_tokens=outputs["paged"] == outputs["dense"],
    )
    command = "python " + " ".join(["benchmarks/ragged_decode.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ragged_decode.json").write_text(json.dumps({"command": command, "row": row}, indent=1))
    md = [
        "# Decode over paged (ragged) layers vs the same entries dense", "",
        f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=src {command}` (embedded SmolLM2-135M, float32, CPU, one "
        "thread, shared machine; fastest of the repeats, runs alternating).", "",
        "| method | ratio | prompt | ragged layers | KV bytes paged | KV bytes dense | tok/s paged | tok/s dense "
        "| paged / dense speed | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {row['method']} | {row['ratio']} | {row['prompt_tokens']} | {row['ragged_layers']} "
        f"| {row['kv_bytes_paged']} | {row['kv_bytes_dense']} | {row['tokens_per_s_paged']} "
        f"| {row['tokens_per_s_dense']} | {row['tokens_per_s_paged'] / row['tokens_per_s_dense']:.2f} "
        f"| {row['same_tokens']} |",
    ]
    (RESULTS / "ragged_decode.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
