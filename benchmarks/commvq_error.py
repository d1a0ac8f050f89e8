"""CommVQ reconstruction error on the embedded model: calibration text vs text the codebooks never saw.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/commvq_error.py --tokens 4096 --iters 2

Loads the cached codebooks of ``slimkv calibrate commvq --tokens T --iters I`` (fits them if missing),
runs three 1,024-token texts through the model with a full cache and prints, per stage count (6 =
commvq1, 14 = commvq2), the relative squared error ``|x - x^|^2 / |x|^2`` of pre-RoPE keys and of
values, averaged over layers: the first calibration tokens (in-sample), later Bible text, the noise
haystack of the needle task.
"""

from __future__ import annotations

import argparse

from slimkv.cache.vq_codes import decode, encode, rope
from slimkv.compressors.quantization import commvq_calibration as cal
from slimkv.engine import Engine
from slimkv.evals.haystacks import NOISE, load_haystack
from slimkv.models import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=2)
    args = p.parse_args()
    model, tok = load_model("smollm2-135m")
    engine = Engine(model, tok)
    books = cal.load_or_fit(engine.runner, cal.Calibration(stages=14, tokens=args.tokens, iters=args.iters))
    inv_freq = engine.adapter.rope_table()
    bible = tok.encode(load_haystack("bible")[: 12 * (args.tokens + 2048)], add_special_tokens=False)
    texts = {"calibration (in-sample)": bible[:1024], "later bible text": bible[args.tokens + 1000 : args.tokens + 2024],
             "noise haystack": tok.encode(NOISE * 120, add_special_tokens=False)[:1024]}
    print("| text | stages | key error | value error |\n|---|---:|---:|---:|")
    for name, ids in texts.items():
        cache = engine.new_cache()
        with engine.adapter.attached():
            engine.prefill(cache, ids)
        for stages in (6, 14):
            errors = {"k": 0.0, "v": 0.0}
            for i, layer in enumerate(cache.layers):
                k, v, pos = layer.view()  # [1, H, N, D]
                for kind, x in (("k", rope(k[0].float(), pos[0], -inv_freq[i])), ("v", v[0].float())):
                    alpha, beta = books[f"{kind}_alpha"][i][:, :stages], books[f"{kind}_beta"][i][:, :stages]
                    xh = decode(*encode(x, alpha, beta), alpha, beta)
                    errors[kind] += float(((x - xh) ** 2).sum() / (x**2).sum()) / len(cache.layers)
            print(f"| {name} | {stages} | {errors['k']:.4f} | {errors['v']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
