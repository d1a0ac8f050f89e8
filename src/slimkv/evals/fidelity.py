"""Fidelity to the full cache and streaming perplexity: how much a method changes the model itself.

- :func:`fidelity`: the full cache greedily continues a prompt; each method, starting from the same
  prefill, is teacher-forced along that continuation. Reported per method: top-1 agreement (share of
  steps whose argmax equals the full cache's token), mean KL(full || method) over the steps, and the
  first step whose argmax differs (``None`` if none does).
- :func:`perplexity`: real text is fed one token at a time with the method compressing in the decode
  phase (the cache never exceeds its budget); the perplexity of the text under that model. A
  quantizer converts the cache after the prefix and then quantizes the stream itself as its groups
  fill, so every scored token reads the quantized cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cache import SlimCache
from ..compressors import Compressor
from ..engine import Engine


@dataclass(frozen=True)
class Fidelity:
    """Agreement of one method with the full cache along the full cache's own continuation."""

    method: str
    steps: int
    top1_agreement: float
    mean_kl: float
    first_difference: int | None


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of ``tokens`` text tokens with a method keeping the cache within its budget."""

    method: str
    tokens: int
    perplexity: float
    max_entries: int
    bytes_kept: int = 0
    bytes_full: int = 0


def decode_step(engine: Engine, cache: SlimCache, token: int, comp: Compressor | None) -> torch.Tensor:
    """One decode step of a cache (``comp`` evicting while decoding, if it does); log-probabilities [vocab]."""
    runner = engine.runner
    logits = runner.forward([runner.row(cache, [token], comp, "decode")])
    return logits[0, -1].float().log_softmax(-1)


def fidelity(engine: Engine, prompt: list[int], methods: dict[str, Compressor], steps: int = 32) -> list[Fidelity]:
    """Teacher-forced agreement of every method with the full cache (one shared prefill)."""
    observers = tuple(c for c in methods.values() if c.active("prefill"))
    with engine.adapter.attached():
        base = engine.new_cache()
        last = engine.prefill(base, prompt, observers=observers)[0].float().log_softmax(-1)
        full = base.clone()
        ref_logp, tokens = [last], []
        for _ in range(steps):
            tokens.append(int(ref_logp[-1].argmax()))
            ref_logp.append(decode_step(engine, full, tokens[-1], None))
        out = []
        for name, comp in methods.items():
            cache = base.clone()
            engine.with_compressor(comp).compress(cache, "prefill")
            logp = [last]
            for t in tokens[:-1]:
                logp.append(decode_step(engine, cache, t, comp))
            agree, kls, first = 0, [], None
            for i, (ref, got) in enumerate(zip(ref_logp[:steps], logp)):
                same = int(got.argmax()) == tokens[i]
                agree += same
                if not same and first is None:
                    first = i
                kls.append(float((ref.exp() * (ref - got)).sum()))
            out.append(Fidelity(name, steps, agree / steps, sum(kls) / steps, first))
    return out


def perplexity(engine: Engine, tokens: list[int], comp: Compressor | None, name: str, prefix: int = 1) -> Perplexity:
    """Perplexity of ``tokens[prefix:]`` fed one token at a time, compressing in the decode phase.

    A quantizer (``comp.quantizes`` without a decode phase) converts the cache once after the prefix;
    its layers quantize every later entry as their groups fill. A method active in the prefill phase
    too (``phase="both"``, FastGen's per-head policies) observes the prefix and compresses it first,
    as a generation's prompt would be.
    """
    if len(tokens) <= prefix:
        raise ValueError("perplexity needs more tokens than the prefix")
    nll, peak = 0.0, 0
    engine.bind(comp)
    with engine.adapter.attached():
        cache = engine.new_cache()
        prompt = comp is not None and comp.active("prefill") and not comp.quantizes
        observers = (comp,) if prompt else ()
        logp = engine.prefill(cache, tokens[:prefix], observers=observers)[0].float().log_softmax(-1)
        if comp is not None and (prompt or (comp.quantizes and not comp.active("decode"))):
            engine.with_compressor(comp).compress(cache, "prefill")
        for t in tokens[prefix:]:
            nll -= float(logp[t])
            logp = decode_step(engine, cache, t, comp)
            peak = max(peak, max(layer.max_length for layer in cache.layers))
        stats = cache.stats()
    count = len(tokens) - prefix
    return Perplexity(name, count, math.exp(nll / count), peak, stats.bytes_kept, stats.bytes_full)
