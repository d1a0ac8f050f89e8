"""Answer the comparison's samples with NVIDIA kvpress (runs in kvpress's own virtual environment).

Reads the samples ``benchmarks/kvpress_compare.py`` wrote (token ids of context and question, so both
libraries see identical inputs) and appends one JSON line per sample, setting, method and ratio:
the greedy answer's token ids, the bytes of the cache's key and value tensors right after the
compressed prefill, and the seconds spent (prefill with the press, question, answer).
Resumable: configurations already in the output file are skipped. Imports nothing from slimkv.

Protocol, as kvpress's own pipeline does it: the press compresses during the prefill of the context
(question-agnostic) or of context + question (question-aware); the question (agnostic) and the answer
then decode greedily over the compressed cache with their original positions.

Usage (normally called by benchmarks/kvpress_compare.py):
    .venv-kvpress/bin/python benchmarks/kvpress/run_kvpress.py MODEL_DIR SAMPLES.jsonl OUT.jsonl \
        --methods streaming_llm,snapkv,knorm,h2o,pyramidkv,expected_attention,keydiff,adasnapkv --ratios 0.5,0.75,0.875
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

#: slimkv method name -> kvpress press class (kvpress's defaults for every other parameter)
PRESSES = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "h2o": "ObservedAttentionPress",  # kvpress's H2O-like press: mean observed attention per key
    "pyramidkv": "PyramidKVPress",
    "expected_attention": "ExpectedAttentionPress",
    "keydiff": "KeyDiffPress",  # the paper's single mean anchor per head
    "adasnapkv": "AdaKVPress",  # wraps SnapKVPress; masks the dropped keys (keeps their bytes)
    "random": "RandomPress",
}


def make_press(method: str, ratio: float):
    if method == "adasnapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    cls = getattr(kvpress, PRESSES[method])
    return cls(compression_ratio=ratio)


def cache_bytes(cache) -> int:
    """Bytes the cache's key and value tensors hold (masked entries included: they are still stored)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def answer(model, press, context: list[int], question: list[int], aware: bool, max_new_tokens: int,
           eos: set[int], ragged: bool) -> tuple[list[int], int]:
    prompt = context + question if aware else context
    cache = DynamicCache()
    ids = torch.tensor([prompt])
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    held = cache_bytes(cache)
    length = len(prompt)
    if not aware and not ragged:
        pos = torch.arange(length, length + len(question))[None]
        out = model(input_ids=torch.tensor([question]), past_key_values=cache, position_ids=pos, logits_to_keep=1)
        length += len(question)
    elif not aware:
        # layers of different lengths (PyramidKV): transformers builds one mask from layer 0's length,
        # which does not fit the others; one token at a time needs no mask (same result, slower)
        for token in question:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[length]]))
            length += 1
    token = int(out.logits[0, -1].argmax())
    generated = [token]
    while len(generated) < max_new_tokens and token not in eos:
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                    position_ids=torch.tensor([[length]]))
        length += 1
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
    return generated, held


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("samples")
    p.add_argument("out")
    p.add_argument("--methods", default=",".join(PRESSES))
    p.add_argument("--ratios", default="0.5,0.75,0.875")
    p.add_argument("--settings", default="agnostic,aware")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in PRESSES and m != "none"]
    if unknown:
        sys.exit(f"no kvpress press for {unknown[0]!r}; known: {', '.join(PRESSES)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    settings = [s == "aware" for s in args.settings.split(",")]
    needs_eager = "h2o" in methods  # ObservedAttentionPress reads attention weights
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                 attn_implementation="eager" if needs_eager else "sdpa")
    sdpa = None
    if needs_eager:  # only the observed-attention press runs eagerly; the others use SDPA as usual
        sdpa = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["length"], r["index"], r["method"], r["ratio"], r["question_aware"]))
    samples = [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()]
    configs = [("none", None)] + [(m, r) for m in methods if m != "none" for r in ratios]
    total = len(samples) * len(settings) * len(configs)
    n = 0
    with out.open("a") as f:
        for s in samples:
            for aware in settings:
                for method, ratio in configs:
                    n += 1
                    key = (s["task"], s["length"], s["index"], method, ratio, aware)
                    if key in done:
                        continue
                    press = None if method == "none" else make_press(method, ratio)
                    runner = model if method == "h2o" or sdpa is None else sdpa
                    t0 = time.perf_counter()
                    ids, held = answer(runner, press, s["context_ids"], s["question_ids"], aware, args.max_new_tokens, eos,
                                 ragged=method == "pyramidkv")
                    seconds = time.perf_counter() - t0
                    f.write(json.dumps({"task": s["task"], "length": s["length"], "index": s["index"],
                                        "method": method, "ratio": ratio, "question_aware": aware,
                                        "answer_ids": ids, "cache_bytes": held,
                                        "seconds": round(seconds, 3)}) + "\n")
                    f.flush()
                    print(f"[{n}/{total}] {s['task']} {s['length']} #{s['index']} {method}@{ratio} "
                          f"{'aware' if aware else 'agnostic'} {seconds:.1f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
