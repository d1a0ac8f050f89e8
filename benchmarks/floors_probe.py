"""Probe question-agnostic eviction on the needle task: scores of several method settings on the
same samples (one prefill per sample, shared), and which needle entries each setting keeps.

Method settings are ``name`` or ``name:param=value:param=value`` (parameters of the registered
method), e.g. ``keydiff``, ``keydiff:pool=7``, ``keydiff:schedule=pyramid``.

Example::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/floors_probe.py --haystack bible \
        --lengths 1000,2000 --samples 5 --ratio 0.75 --methods keydiff,keydiff:pool=7 --survival

The survival table locates the needle sentence in the prompt by its text - for analysis only; no
method sees it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass

import torch

from slimkv.compressors import make_compressor
from slimkv.compressors.eviction.keydiff import KeyDiffCompressor
from slimkv.compressors.registry import register
from slimkv.engine import Engine, Segments
from slimkv.evals.runner import EvalSample, MethodSpec, Runner
from slimkv.evals.tasks import make_samples
from slimkv.models import load_model


NEEDLE: set[int] = set()  # needle positions of the sample being scored, for the oracle only


@register
@dataclass
class OracleKeyDiff(KeyDiffCompressor):
    """Diagnostic only: keydiff that always keeps the needle sentence (tells whether losing it is the cause)."""

    name = "probe_oracle"

    def score(self, layer, ctx):
        score = super().score(layer, ctx)
        _, _, positions = layer.view()
        for p in NEEDLE:
            score = score.masked_fill(positions == p, float("inf"))
        return score


@register
@dataclass
class ProbeKeyDiff(KeyDiffCompressor):
    """Diagnostic variants of keydiff.

    norm: how per-head scores are made comparable before the head mean ("none", "z", "rank")
    anchors: reference directions per head (k-means on unit keys; score = -max cosine to any)
    pool: max-pool the final scores over neighbouring positions (odd kernel)
    lo, hi: layer range where the needle is forced in (oracle)
    """

    norm: str = "none"
    anchors: int = 1
    pool: int = 1
    lo: int = 99
    hi: int = 99

    name = "probe_kd"

    def score(self, layer, ctx):
        import torch.nn.functional as F

        keys, _, positions = layer.view()
        unit = F.normalize(keys.float(), dim=-1)  # [B, H, L, D]
        centre = F.normalize(unit.mean(dim=2, keepdim=True), dim=-1)
        if self.anchors == 1:
            raw = -(unit * centre).sum(-1)
        else:  # spherical k-means, seeded from evenly spaced keys
            n = unit.shape[2]
            cent = unit[:, :, torch.linspace(0, n - 1, self.anchors).long()]  # [B, H, C, D]
            for _ in range(5):
                assign = (unit @ cent.transpose(-1, -2)).argmax(-1)  # [B, H, L]
                onehot = F.one_hot(assign, self.anchors).float()  # [B, H, L, C]
                cent = F.normalize(onehot.transpose(-1, -2) @ unit, dim=-1)
            raw = -(unit @ cent.transpose(-1, -2)).amax(-1)
        if self.norm == "z":
            raw = (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, keepdim=True).clamp(min=1e-6)
        elif self.norm == "rank":
            raw = raw.argsort(-1).argsort(-1).float()
        if self.heads == "mean":
            raw = raw.mean(dim=1, keepdim=True).expand_as(raw)
        if self.pool > 1:
            b, h, n = raw.shape
            order = positions.argsort(dim=-1)
            pooled = F.max_pool1d(raw.gather(-1, order).reshape(b * h, 1, n), self.pool, stride=1,
                                  padding=self.pool // 2).view(b, h, n)
            raw = torch.empty_like(raw).scatter_(-1, order, pooled)
        recent = positions >= (ctx.seen.to(positions.device) - self.window)[:, None, None]
        score = raw.masked_fill(recent | (positions < self.sinks), float("inf"))
        if self.lo <= ctx.layer_idx <= self.hi:
            for p in NEEDLE:
                score = score.masked_fill(positions == p, float("inf"))
        return score


@register
@dataclass
class LocalKeyDiff(KeyDiffCompressor):
    """Diagnostic: keydiff whose centres are fitted per chunk of ``chunk`` consecutive slots (local typicality)."""

    chunk: int = 1024

    name = "probe_local"

    def score(self, layer, ctx):
        import torch.nn.functional as F

        from slimkv.compressors.eviction.keydiff import _head_mean, nearest_centre

        keys, _, positions = layer.view()  # [B, H, L, D]
        b, h, n, d = keys.shape
        unit = F.normalize(keys.float(), dim=-1)
        order = positions.argsort(dim=-1)
        unit = unit.gather(2, order[..., None].expand(-1, -1, -1, d))
        parts = -(-n // self.chunk)
        pad = parts * self.chunk - n
        valid = torch.ones(b, h, n, dtype=torch.bool)
        if pad:
            unit = F.pad(unit, (0, 0, 0, pad))
            valid = F.pad(valid, (0, pad))
        # the padding slots of the last chunk are marked invalid: they take no part in its centres
        sim = nearest_centre(unit.view(b, h * parts, self.chunk, d), valid.view(b, h * parts, self.chunk),
                             int(self.anchors)).view(b, h, parts * self.chunk)[..., :n]
        raw = torch.empty_like(sim).scatter_(-1, order, -sim)
        if self.heads == "mean":
            raw = _head_mean(raw, positions, layer)
        recent = positions >= (ctx.seen.to(positions.device) - self.window)[:, None, None]
        return raw.masked_fill(recent | (positions < self.sinks), float("inf"))


@dataclass(frozen=True)
class ProbeSpec(MethodSpec):
    """A method with extra parameters (``params``: sorted (name, value) pairs)."""

    params: tuple = ()
    text: str = ""

    def build(self):
        return make_compressor(self.name, ratio=self.ratio, budget=self.budget, **dict(self.params))

    @property
    def label(self) -> str:
        return self.text or self.name


def parse(text: str, ratio: float, tag: bool = False) -> ProbeSpec:
    name, *rest = text.split(":")
    params = []
    for item in rest:
        key, value = item.split("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        params.append((key, value))
    return ProbeSpec(name=name, ratio=None if name == "none" else ratio, params=tuple(sorted(params)),
                     text=f"{text}@{ratio}" if tag else text)


def needle_span(tokenizer, context: str, needle_prefix: str = "The special magic number is") -> list[int]:
    """Token positions of the needle sentence (analysis only)."""
    start = context.find(needle_prefix)
    end = context.find(".", start + len(needle_prefix)) + 1
    enc = tokenizer(context, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end]


def survival(engine: Engine, sample: EvalSample, specs: list[ProbeSpec]) -> dict:
    """Per setting: [layer] -> share of (needle token, KV head) entries kept; and per token kept heads."""
    tok = engine.tokenizer
    ids = tok.encode(sample.context)
    span = needle_span(tok, sample.context)
    observers = tuple(s.build() for s in specs)
    with engine.adapter.attached():
        base = engine.new_cache()
        engine.prefill(base, ids, observers=tuple(o for o in observers if o.active("prefill")))
        out = {"tokens": [tok.decode([ids[i]]) for i in span]}
        for spec, comp in zip(specs, observers):
            cache = base.clone()
            engine.with_compressor(comp).compress(cache, "prefill")
            per_layer, per_token = [], torch.zeros(len(span))
            for layer in cache.layers:
                _, _, pos = layer.view()  # [1, H, L]
                kept = torch.stack([(pos[0] == p).any(dim=-1) for p in span], dim=-1)  # [H, n]
                per_layer.append(round(float(kept.float().mean()), 2))
                per_token += kept.float().mean(dim=0)
            out[spec.label] = {"per_layer": per_layer,
                               "per_token": [round(float(x), 2) for x in per_token / len(cache.layers)]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="needle", help="needle (default) or another task, e.g. multikey")
    p.add_argument("--haystack", default="bible")
    p.add_argument("--lengths", default="1000,2000")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", default="0.75", help="one ratio or several, comma-separated")
    p.add_argument("--methods", default="keydiff")
    p.add_argument("--survival", action="store_true", help="print which needle entries are kept")
    p.add_argument("--survival-sample", type=int, default=0, help="sample index for --survival (default 0)")
    p.add_argument("--no-score", action="store_true")
    p.add_argument("--answers", action="store_true", help="print every answer")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--perplexity", type=int, default=0, metavar="BUDGET",
                   help="instead: decode-phase streaming perplexity of the methods at this budget "
                        "(as `slimkv eval perplexity --tokens 1024`)")
    args = p.parse_args()
    model, tokenizer = load_model()
    engine = Engine(model, tokenizer)
    if args.perplexity:
        from slimkv.cli.eval import _text_tokens
        from slimkv.evals.fidelity import perplexity

        tokens = _text_tokens(tokenizer, "bible", 1025, 200_000)
        for text in args.methods.split(","):
            spec = parse(text, 0.0)
            comp = make_compressor(spec.name, budget=args.perplexity, phase="decode", **dict(spec.params))
            row = perplexity(engine, tokens, comp, text)
            print(json.dumps({"budget": args.perplexity, **row.__dict__}), flush=True)
        return
    ratios = [float(r) for r in args.ratio.split(",")]
    specs = [parse(m, r, len(ratios) > 1) for r in ratios for m in args.methods.split(",")]
    for length in [int(x) for x in args.lengths.split(",")]:
        samples = [EvalSample(task=args.task, length=length, index=i, context=s.context, question=s.question,
                              answers=tuple(s.answers), depth=s.depth)
                   for i, s in enumerate(make_samples(args.task, tokenizer, length, args.samples, seed=args.seed,
                                                      haystack=args.haystack))]
        if args.survival:
            print(json.dumps({"length": length, **survival(engine, samples[args.survival_sample], specs)}))
        if args.no_score:
            continue
        t0 = time.perf_counter()
        runner = Runner(engine, max_new_tokens=args.max_new_tokens)
        results = []
        for sample in samples:
            NEEDLE.clear()
            NEEDLE.update(needle_span(tokenizer, sample.context))
            results += runner.evaluate([sample], [ProbeSpec("none", text="none"), *specs])
        by: dict[str, list[float]] = {}
        for r in results:
            by.setdefault(r.method, []).append(r.score)
        # results carry only the name; map back by order within each sample
        per = len(specs) + 1
        labels = ["none", *[s.label for s in specs]]
        scores = {lab: [results[i].score for i in range(j, len(results), per)] for j, lab in enumerate(labels)}
        print(json.dumps({"task": args.task, "haystack": args.haystack, "length": length, "ratios": ratios,
                          "samples": args.samples, "seconds": round(time.perf_counter() - t0, 1),
                          "scores": {k: round(sum(v) / len(v), 3) for k, v in scores.items()},
                          "per_sample": {k: v for k, v in scores.items()}}), flush=True)
        if args.answers:
            for j, lab in enumerate(labels):
                print(json.dumps({lab: [results[i].answer for i in range(j, len(results), per)]}))


if __name__ == "__main__":
    main()
