"""Question-agnostic needle for quantizer variants on the same samples (one prefill per sample).

    python benchmarks/quant_needle.py LENGTHS SAMPLES METHODS [OUT.jsonl]
    e.g. python benchmarks/quant_needle.py 1000,2000 5 none,kivi2-plain,kivi2,zipvl,kivi4,minikv@0.5 out.jsonl

`kivi2-plain` is kivi2 without the sinks and the rotation (the layout before they were added), for
comparison. One line per sample and method is printed as it finishes, then a summary per length.
"""
import sys, json, dataclasses
from dataclasses import dataclass, field
import torch
import slimkv
from slimkv.compressors.registry import register
from slimkv.compressors.quantization.kivi import KIVI2
from slimkv.engine import Engine
from slimkv.evals.runner import EvalSample, MethodSpec, Runner
from slimkv.evals.tasks import make_samples
torch.set_num_threads(1)

@register
@dataclass
class Plain(KIVI2):
    """kivi2 as before: no sinks, no rotation"""
    sinks: int = 0
    rotate: bool = False
    name = "kivi2-plain"

lengths = [int(x) for x in sys.argv[1].split(",")]; n = int(sys.argv[2])
methods = []
for m in sys.argv[3].split(","):
    name, _, r = m.partition("@")
    methods.append(MethodSpec(name, ratio=float(r) if r else None))
model, tok = slimkv.load_model()
runner = Runner(Engine(model, tok), max_new_tokens=12)
evals = []
for length in lengths:
    for i, s in enumerate(make_samples("needle", tok, length, n, seed=0)):
        evals.append(EvalSample(task="needle", length=length, index=i, context=s.context, question=s.question,
                                answers=tuple(s.answers), depth=s.depth))
rows = []
def show(r):
    rows.append(dataclasses.asdict(r))
    print(f"{r.length} #{r.index} {r.method}@{r.ratio} {r.score:.0f} {r.answer!r} kv={r.bytes_kept/r.bytes_full:.3f}", flush=True)
runner.evaluate(evals, methods, question_aware=False, on_result=show)
for length in lengths:
    for m in methods:
        sc = [r["score"] for r in rows if r["length"] == length and r["method"] == m.name and r["ratio"] == m.ratio]
        print(f"SUMMARY {length} {m.label} {sum(sc)}/{len(sc)}")
if len(sys.argv) > 4:
    open(sys.argv[4], "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
