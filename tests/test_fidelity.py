"""Fidelity and streaming perplexity on a tiny random model."""

from __future__ import annotations

import math

import torch

from slimkv.compressors import make_compressor
from slimkv.engine import Engine
from slimkv.evals.fidelity import fidelity, perplexity

from .conftest import ToyTokenizer, prompt_ids


def test_fidelity_is_perfect_without_compression_and_bounded_with_it(llama):
    engine = Engine(llama, ToyTokenizer())
    rows = fidelity(engine, prompt_ids(60), {"ratio0": make_compressor("snapkv", ratio=0.0),
                                             "knorm": make_compressor("knorm", ratio=0.75)}, steps=12)
    exact, lossy = rows
    assert exact.top1_agreement == 1.0 and exact.first_difference is None and abs(exact.mean_kl) < 1e-6
    assert 0.0 <= lossy.top1_agreement <= 1.0 and lossy.mean_kl >= -1e-6


def test_perplexity_matches_a_full_forward_and_keeps_the_budget(llama):
    engine = Engine(llama, ToyTokenizer())
    tokens = prompt_ids(80, seed=3)
    full = perplexity(engine, tokens, None, "none")
    with torch.no_grad():
        logp = llama(torch.tensor([tokens])).logits[0].float().log_softmax(-1)
    nll = -sum(float(logp[i, tokens[i + 1]]) for i in range(len(tokens) - 1))
    assert math.isclose(full.perplexity, math.exp(nll / (len(tokens) - 1)), rel_tol=1e-4)
    streamed = perplexity(engine, tokens, make_compressor("streaming_llm", budget=24, phase="decode"), "s")
    assert streamed.max_entries <= 24 and streamed.perplexity > 0


def test_perplexity_with_a_quantizer_reads_the_quantized_stream(llama):
    engine = Engine(llama, ToyTokenizer())
    tokens = prompt_ids(300, seed=4)
    full = perplexity(engine, tokens, None, "none")
    q8 = perplexity(engine, tokens, make_compressor("kivi8", group=32), "kivi8")
    q2 = perplexity(engine, tokens, make_compressor("kivi2", group=32), "kivi2")
    # the stream really is quantized: fewer bytes than the full cache, and 2 bits moves the result more than 8
    assert q2.bytes_kept < q8.bytes_kept < full.bytes_kept
    assert abs(q8.perplexity / full.perplexity - 1) < abs(q2.perplexity / full.perplexity - 1)
    assert abs(q8.perplexity / full.perplexity - 1) < 0.01
