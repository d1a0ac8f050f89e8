"""Generation within a fixed budget: 1,024 greedy tokens after a 512-token prompt, 256 entries per head.

Every decode-capable method runs with ``budget=256, phase="both"``: the prompt is compressed to the
budget after its prefill, then every decode step evicts an entry before it writes the new one. After
every step the cache is checked:

- entries: the most any layer and KV head holds; must stay <= the budget. FastGen spends a layer's
  budget across its heads (each follows its own policy), so for it the layer's mean per head must stay
  <= the budget (+1: a head may also hold the newest token until the next step);
- bytes of the entries (keys, values, positions, free slots and per-entry state such as H2O's
  accumulated mass): once every row holds the budget they must never grow again (a fixed number of
  entries in fixed slots is a fixed number of bytes);
- bytes of the method's per-layer state (ALISA's latest queries): fixed-size, so they must not grow in
  the second half of the generation beyond what they reached in the first.

Both are asserted at every step (the run stops with an error if one fails). The table also gives the
bytes a full-cache layer of 256 entries holds (``none`` after a 256-token prefill), so the method's own
state shows as the difference, and the full cache's bytes at the end (1,536 tokens).

    OMP_NUM_THREADS=1 python benchmarks/decode_budget.py [--methods ...] [--prompt 512] [--new-tokens 1024] [--budget 256] [--update]

Results go to benchmarks/results/decode_budget.{json,md} with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

import slimkv
from slimkv import compressors
from slimkv.engine import Engine
from slimkv.evals.fidelity import decode_step
from slimkv.evals.haystacks import load_haystack

RESULTS = Path(__file__).parent / "results"
OFFSET = 200_000  # characters into the Bible: held-out text, as the perplexity table uses


def decode_capable() -> list[str]:
    return [n for n in compressors.names() if n != "none" and "decode" in compressors.method_info(n).phases]


def run(engine: Engine, prompt: list[int], name: str, budget: int, steps: int) -> dict:
    """Greedy ``steps`` tokens after ``prompt`` with ``name`` at ``budget``; checks every step."""
    comp = None if name == "none" else compressors.make_compressor(name, budget=budget, phase="both")
    engine = engine.with_compressor(comp)
    t0 = time.perf_counter()
    with engine.adapter.attached():
        cache = engine.new_cache()
        logits = engine.prefill(cache, prompt)
        engine.compress(cache, "prefill")
        after_prefill = cache.stats().bytes_kept
        token = int(logits[0].argmax())
        peak_entries, peak_mean, at_budget, peak_bytes, state_first_half, tokens = 0, 0.0, None, 0, 0, []
        heads = engine.adapter.spec.kv_heads
        headwise = comp is not None and comp.allocation == "head"
        for step in tqdm(range(steps), desc=name, unit="tok", leave=False):
            tokens.append(token)
            logp = decode_step(engine, cache, token, comp)  # [vocab]; generated punctuation flagged
            token = int(logp.argmax())
            entries = max(layer.max_length for layer in cache.layers)
            per_head = max(int(layer.lengths.sum(-1).max()) for layer in cache.layers) / heads  # layer mean
            held = cache.stats().bytes_kept
            state = sum(states.nbytes() for states in cache.states)  # per-layer compressor state
            peak_entries, peak_bytes = max(peak_entries, entries), max(peak_bytes, held)
            peak_mean = max(peak_mean, per_head)
            if step < steps // 2:
                state_first_half = max(state_first_half, state)
            elif state > state_first_half:
                raise AssertionError(f"{name}: step {step} holds {state} bytes of per-layer state, more than "
                                     f"the {state_first_half} of the first half: it grows with the generation")
            if comp is None:
                continue
            if headwise and per_head > budget + 1:  # a head may also hold its newest token
                raise AssertionError(f"{name}: step {step} holds {per_head:.1f} entries per head in a layer, "
                                     f"budget {budget}")
            if not headwise and entries > budget:
                raise AssertionError(f"{name}: step {step} holds {entries} entries in a row, budget {budget}")
            full = all(int(layer.lengths.sum(-1).min()) >= budget * heads if headwise else
                       int(layer.lengths.min()) >= budget for layer in cache.layers if layer.lengths is not None)
            if at_budget is None and full:
                at_budget = held - state
            elif at_budget is not None and held - state > at_budget:
                raise AssertionError(f"{name}: step {step} holds {held - state} bytes of entries, more than the "
                                     f"{at_budget} it held when every row first reached the budget")
        stats = cache.stats()
    return {"method": name, "steps": steps, "max_entries": peak_entries, "max_mean_entries": round(peak_mean, 1), "bytes_after_prefill": after_prefill,
            "entry_bytes_at_budget": at_budget, "state_bytes": state_first_half, "max_bytes": peak_bytes, "bytes_full_end": stats.bytes_full,
            "seconds": round(time.perf_counter() - t0, 1),
            "text": engine.tokenizer.decode(tokens[:32], skip_special_tokens=True)}


def reference_bytes(engine: Engine, prompt: list[int], budget: int) -> int:
    """Bytes of the full cache holding ``budget`` tokens (keys, values, positions)."""
    with engine.adapter.attached():
        cache = engine.new_cache()
        engine.prefill(cache, prompt[:budget])
        return cache.stats().bytes_kept


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(decode_capable()))
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--budget", type=int, default=256, help="entries per layer and KV head")
    p.add_argument("--out", default=str(RESULTS / "decode_budget"))
    p.add_argument("--update", action="store_true",
                   help="re-measure only --methods; keep the other methods' rows (and commands) of the existing results")
    args = p.parse_args()
    model, tokenizer = slimkv.load_model()
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode(load_haystack("bible")[OFFSET:OFFSET + 20 * args.prompt])[:args.prompt]
    ref = reference_bytes(engine, prompt, args.budget)
    rows = []
    for name in [m for m in args.methods.split(",") if m]:
        row = run(engine, prompt, name, args.budget, args.new_tokens)
        rows.append(row)
        print(f"{name}: max entries {row['max_entries']}, max bytes {row['max_bytes']:,} "
              f"({row['max_bytes'] / ref:.3f} of a {args.budget}-entry full cache), {row['seconds']} s", file=sys.stderr)
    command = ("OMP_NUM_THREADS=1 python benchmarks/decode_budget.py " + " ".join(sys.argv[1:])).strip()
    commands = [command]
    out = Path(args.out)
    if args.update and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        done = {r["method"] for r in rows}
        rows = sorted([r for r in old["rows"] if r["method"] not in done] + rows, key=lambda r: r["method"])
        commands = old.get("commands", [old.get("command", "")]) + commands
    lines = [
        "# Generation within a fixed budget", "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands), "",
        (f"{args.new_tokens} greedy tokens after a {args.prompt}-token prompt (held-out Bible text), "
        f"`budget={args.budget}`, `phase=\"both\"`; embedded SmolLM2-135M, fp32, CPU. Checked after every "
        "step (the run fails otherwise): no layer or KV head holds more than the budget (FastGen: no layer more "
         "than the budget per head on average, +1); once every "
        "row holds the budget the bytes of the entries never grow; the per-layer state (fixed-size) does "
        "not grow after the first half. Max bytes count everything the cache holds (keys, values, "
        f"positions, free slots, the method's state). A full cache of {args.budget} tokens "
        f"holds {ref:,} bytes; the full cache at the end would hold {rows[0]['bytes_full_end'] if rows else 0:,}."), "",
        f"| method | max entries per row | max mean per head | bytes after prefill | entry bytes at budget | state bytes | max bytes | vs {args.budget}-token full cache | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        at = "-" if r["entry_bytes_at_budget"] is None else f"{r['entry_bytes_at_budget']:,}"
        lines.append(f"| {r['method']} | {r['max_entries']} | {r['max_mean_entries']} | {r['bytes_after_prefill']:,} | {at} | {r['state_bytes']:,} | "
                     f"{r['max_bytes']:,} | {r['max_bytes'] / ref:.3f} | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"commands": commands, "reference_bytes": ref, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
