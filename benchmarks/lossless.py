"""Lossless decoding vs full-cache decoding, in one run: speed, identical text, acceptance per drafter.

Two tasks on the embedded model, each prefilled once (the compressor observes that prefill; every
configuration decodes from a clone of it), greedy, a fixed number of new tokens (EOS ignored):

  long  - ``--context`` tokens of essay text, then a request to continue it (the 8k-context case)
  code  - a Python source file in the prompt and a request to repeat it with docstrings (a
          repetitive task, where lookup drafters shine)

Configurations: ``full`` (plain decoding, full cache: the reference), ``snapkv`` (plain decoding with
SnapKV keeping 1/8: lossy, for speed only), and ``--lossless --compressor snapkv --ratio 0.875`` with
the drafters self, prompt, auto and rest (a datastore over transformers' Llama/Mistral/Qwen2 sources,
not containing the prompt). Every lossless text is checked token for token against ``full``.

    nice -n 5 python benchmarks/lossless.py [--context 8000] [--new-tokens 256] [--tasks long,code]

Results go to benchmarks/results/lossless.{json,md} with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimkv
from slimkv.engine import Engine, GenerationConfig, LosslessConfig, Segments
from slimkv.evals.haystacks import load_haystack
from slimkv.speculative.datastore import Datastore, tokenizer_fingerprint

RESULTS = Path(__file__).parent / "results"
CODE_FILE = Path(slimkv.__file__).parent / "compressors" / "base.py"


def long_prompt(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(load_haystack("essays"), add_special_tokens=False)[: n - 12]
    tail = tokenizer.encode("\n\nContinue the essay above in the same style:\n", add_special_tokens=False)
    return ids + tail


def code_prompt(tokenizer) -> list[int]:
    code = CODE_FILE.read_text()
    text = (f"```python\n{code}```\n\nRewrite the module above exactly, adding a one-line comment above "
            f"every method.\n\n```python\n")
    return tokenizer.encode(text, add_special_tokens=False)


def build_datastore(tokenizer, out: Path) -> dict:
    import transformers

    root = Path(transformers.__file__).parent / "models"
    files = [root / m / f"modeling_{m}.py" for m in ("llama", "mistral", "qwen2", "gemma", "phi3")]
    docs = [tokenizer.encode(f.read_text(), add_special_tokens=False) for f in files if f.is_file()]
    t0 = time.perf_counter()
    size = Datastore.build(docs, tokenizer_fingerprint(tokenizer)).save(out)
    return {"files": [str(f.relative_to(root.parent.parent)) for f in files if f.is_file()],
            "tokens": sum(map(len, docs)), "bytes": size, "build_s": round(time.perf_counter() - t0, 2)}


def run_task(model, tokenizer, ids: list[int], new: int, drafters: list[str]) -> dict:
    snap = slimkv.make_compressor("snapkv", ratio=0.875)
    seg = Segments(ids, [])
    cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)
    observer = Engine(model, tokenizer, snap)
    full = observer.new_cache()
    t0 = time.perf_counter()
    with observer.adapter.attached():
        logits = observer.prefill(full, ids)  # SnapKV observes its window; nothing is compressed
    prefill_s = time.perf_counter() - t0
    print(f"  prefill {len(ids)} tokens: {prefill_s:.1f} s", file=sys.stderr)
    rows = {}

    def record(name, result, extra=None):
        rows[name] = {"decode_tokens_per_s": round(result.timing.decode_tokens_per_s, 3),
                      "generated": len(result.token_ids), "kv_bytes": result.cache.bytes_kept, **(extra or {})}
        print(f"  {name}: {result.timing.decode_tokens_per_s:.2f} tok/s {extra or ''}", file=sys.stderr)

    ref = Engine(model, tokenizer).continue_from(full.clone(), logits, seg, cfg)
    record("full", ref)
    compressed = full.clone()
    lossy = Engine(model, tokenizer, snap)
    with lossy.adapter.attached():
        lossy.compress(compressed, "prefill")
    plain_snap = lossy.continue_from(compressed, logits, seg, cfg)
    record("snapkv", plain_snap, {"identical_to_full": plain_snap.token_ids == ref.token_ids})
    for drafter in drafters:
        lcfg = GenerationConfig(max_new_tokens=new, ignore_eos=True, lossless=LosslessConfig(drafter=drafter))
        r = Engine(model, tokenizer, snap).continue_from(full.clone(), logits, seg, lcfg)
        s = r.spec
        name = "lossless:" + drafter.split(":")[0] + ("+rest" if drafter.startswith("auto:") else "")
        record(name, r, {
            "identical_to_full": r.token_ids == ref.token_ids,
            "speedup_vs_full": round(r.timing.decode_tokens_per_s / ref.timing.decode_tokens_per_s, 3),
            "drafted": s.drafted, "accepted": s.accepted, "verify_passes": s.verify_passes,
            "mean_accepted_per_pass": round(s.mean_accepted_per_pass, 3),
            "by_drafter": {k: {"passes": v[0], "drafted": v[1], "accepted": v[2]} for k, v in s.by_drafter.items()},
            "draft_view_bytes": s.draft_view_bytes, "full_view_bytes": s.full_view_bytes,
            "full_view_location": s.full_view_location,
        })
    return {"prompt_tokens": len(ids), "new_tokens": new, "prefill_s": round(prefill_s, 2),
            "sample_text": ref.text[:300], "configs": rows}


def markdown(report: dict) -> str:
    out = ["# Lossless decoding (VeriCache-style) vs full-cache decoding", "",
           f"Last command: `{report['command']}`", "",
           f"Machine: {report['machine']}; torch threads {report['threads']}. Shared CPU: absolute tok/s are "
           "noisy, ratios within one task are taken in the same run.", ""]
    for task, t in report["tasks"].items():
        out += [f"## {task}: {t['prompt_tokens']} prompt tokens, {t['new_tokens']} new tokens "
                f"(prefill {t['prefill_s']} s)", "", f"Command: `{t.get('command', report['command'])}`", "",
                "| config | tok/s | x full | identical | drafted | accepted | passes | accepted/pass | "
                "draft view (fast tier) | full view |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        full = t["configs"]["full"]["decode_tokens_per_s"]
        for name, r in t["configs"].items():
            ratio = r["decode_tokens_per_s"] / full if full else 0
            ident = {True: "yes", False: "**no**"}.get(r.get("identical_to_full"), "ref")
            spec = [str(r.get(k, "-")) for k in ("drafted", "accepted", "verify_passes", "mean_accepted_per_pass")]
            views = [f"{r['draft_view_bytes'] / 1e6:.1f} MB" if "draft_view_bytes" in r else
                     f"{r['kv_bytes'] / 1e6:.1f} MB",
                     f"{r['full_view_bytes'] / 1e6:.1f} MB ({r['full_view_location']})" if "full_view_bytes" in r
                     else "-"]
            out.append(f"| {name} | {r['decode_tokens_per_s']:.2f} | {ratio:.2f} | {ident} | " + " | ".join(spec)
                       + " | " + " | ".join(views) + " |")
        out.append("")
    if report.get("datastore"):
        d = report["datastore"]
        out += [f"REST datastore: {d['tokens']} tokens from {', '.join(d['files'])} ({d['bytes'] / 1e6:.1f} MB, "
                f"built in {d['build_s']} s).", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--tasks", default="long,code")
    ap.add_argument("--long-drafters", default="self,prompt,auto", help="drafters of the long task")
    ap.add_argument("--out", default=str(RESULTS / "lossless"))
    args = ap.parse_args()
    model, tokenizer = slimkv.load_model()
    command = "python " + " ".join(sys.argv)
    report = {"command": command, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "tasks": {}}
    previous = Path(args.out + ".json")
    if previous.is_file():  # tasks measured by an earlier invocation are kept (each records its command)
        old = json.loads(previous.read_text())
        for name, task in old.get("tasks", {}).items():
            report["tasks"][name] = {"command": task.get("command", old.get("command")), **task}
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "code.skv"
        report["datastore"] = build_datastore(tokenizer, ds)
        for task in args.tasks.split(","):
            print(f"task {task}", file=sys.stderr)
            if task == "long":
                ids, drafters = long_prompt(tokenizer, args.context), args.long_drafters.split(",")
            else:
                ids, drafters = code_prompt(tokenizer), ["self", "prompt", f"rest:{ds}", f"auto:{ds}"]
            report["tasks"][task] = {"command": command,
                                     **run_task(model, tokenizer, ids, args.new_tokens, drafters)}
            Path(args.out + ".json").write_text(json.dumps(report, indent=1))
            Path(args.out + ".md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
