"""KV bytes of head-wise budgets: paged (ragged) layers against the same entries padded dense.

For one needle prompt per length (question-agnostic: the context is compressed), every method and
ratio: entries kept (all layers and KV heads), bytes held by the cache as slimkv stores it, and the
bytes the same entries would take in the dense layout (every head padded to its layer's longest
head), plus how unequal the heads are (the mean over layers of longest / shortest head).

    python benchmarks/ragged_bytes.py [--lengths 1000,2000] [--ratios 0.75,0.875]

Results go to benchmarks/results/ragged_bytes.{json,md} with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import slimkv
from slimkv.cache import RaggedLayer
from slimkv.engine import Engine, Segments
from slimkv.evals.needle import needle_sample

RESULTS = Path(__file__).parent / "results"
METHODS = ("snapkv", "adasnapkv", "fastgen")


def measure(engine: Engine, tokenizer, length: int, ratios: list[float]) -> list[dict]:
    sample = needle_sample(tokenizer, length, depth=0.5, seed=0)
    context = tokenizer.encode(sample.context)
    comps = {(m, r): slimkv.make_compressor(m, ratio=r) for m in METHODS for r in ratios}
    observers = tuple({type(c): c for c in comps.values()}.values())
    rows = []
    with engine.adapter.attached():
        base = engine.new_cache()
        engine.prefill(base, context, observers=observers)
        for (method, ratio), comp in comps.items():
            cache = base.clone()
            engine.with_compressor(comp).compress(cache, "prefill")  # frees the observation state
            padded = sum(layer.to_dense().nbytes() if isinstance(layer, RaggedLayer) else layer.nbytes()
                         for layer in cache.layers)
            spread = [float(layer.lengths.max() / layer.lengths.min().clamp(min=1)) for layer in cache.layers]
            stats = cache.stats()
            rows.append(dict(
                length=len(context), method=method, ratio=ratio,
                entries=sum(layer.entries() for layer in cache.layers),
                bytes_kept=stats.bytes_kept, bytes_padded_dense=padded, bytes_full=stats.bytes_full,
                ragged_layers=sum(isinstance(layer, RaggedLayer) for layer in cache.layers),
                layers=len(cache.layers),
                head_spread=round(sum(spread) / len(spread), 2),
            ))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1000,2000")
    p.add_argument("--ratios", default="0.75,0.875")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = slimkv.load_model()
    engine = Engine(model, tokenizer)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows += measure(engine, tokenizer, length, [float(r) for r in args.ratios.split(",")])
    command = "python " + " ".join(["benchmarks/ragged_bytes.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ragged_bytes.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = [
        "# KV bytes of head-wise budgets: paged layers vs the same entries padded dense", "",
        f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=src {command}` (embedded SmolLM2-135M, float32, one "
        "needle prompt per length, depth 0.5, seed 0, context compressed question-agnostic).", "",
        "| prompt tokens | method | ratio | entries kept | KV MB held | MB if padded dense | padding avoided "
        "| ragged layers | head spread (max/min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        saved = 1 - r["bytes_kept"] / r["bytes_padded_dense"]
        lines.append(
            f"| {r['length']} | {r['method']} | {r['ratio']} | {r['entries']} | {r['bytes_kept'] / 1e6:.3f} "
            f"| {r['bytes_padded_dense'] / 1e6:.3f} | {saved:.1%} | {r['ragged_layers']}/{r['layers']} | {r['head_spread']} |"
        )
    (RESULTS / "ragged_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
