"""Every registered compressor on a tiny random GQA model: budgets in bytes, exactness at ratio 0,
original positions, batching. New compressors join automatically through the registry."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from slimkv import compressors
from slimkv.cache import RaggedLayer
from slimkv.cache.ragged import BLOCK
from slimkv.engine import Engine, GenerationConfig, Segments

from .conftest import ToyTokenizer, prompt_ids

ALL = compressors.names()
EVICTION = [n for n in ALL if compressors.method_info(n).kind == "eviction"]
QUANT = [n for n in ALL if compressors.method_info(n).kind == "quantization"]
MERGING = [n for n in ALL if compressors.method_info(n).kind == "merging"]
LOSSY = [n for n in ALL if n != "none"]
DECODE = [n for n in EVICTION if "decode" in compressors.method_info(n).phases]
# methods spending a layer's budget across KV heads by score: heads keep different counts (ragged pages)
HEADWISE = [n for n in EVICTION if compressors.make_compressor(n).allocation == "head"]
RATIOS = [0.25, 0.5, 0.75]


def engine_for(model, name, **kw):
    return Engine(model, ToyTokenizer(), compressors.make_compressor(name, **kw))


def expected_bytes(layer_entries: int, spec, batch: int = 1, slot_states: int = 0) -> int:
    """Bytes of one compacted layer: keys + values + int32 positions + int64 lengths (+ float32 state)."""
    rows = batch * spec.kv_heads
    element = torch.empty((), dtype=spec.dtype).element_size()
    per_entry = 2 * spec.head_dim * element + 4 + 4 * slot_states
    return rows * layer_entries * per_entry + rows * 8


@pytest.mark.parametrize("name", ALL)
def test_every_method_is_documented(name):
    info = compressors.method_info(name)
    assert info.paper and info.summary and info.phases
    cls = compressors.registry._lookup(name)
    module_doc = __import__(cls.__module__, fromlist=["x"]).__doc__ or ""
    if name not in ("none",):
        assert "arXiv" in module_doc or "arXiv" in info.paper


@pytest.mark.parametrize("name", EVICTION + MERGING + [f"snapkv+{m}" for m in MERGING])
@pytest.mark.parametrize("ratio", RATIOS)
def test_prefill_keeps_budget_in_bytes(llama, name, ratio):
    engine = engine_for(llama, name, ratio=ratio, phase="prefill")
    ids = prompt_ids(80)
    cache, _ = engine.prepare(Segments(ids, []))
    keep = int(80 * (1 - ratio))
    spec = engine.adapter.spec
    comp = engine.compressor
    per_layer = [int(comp.keep_for(torch.tensor([80]), i, spec.layers)) for i in range(spec.layers)]
    assert abs(sum(per_layer) - keep * spec.layers) < spec.layers  # a schedule spreads the same total
    for layer, n in zip(cache.layers, per_layer):
        if name in HEADWISE:  # the layer's total is spent across heads; pages hold each head's own count
            assert int(layer.lengths.sum()) <= n * spec.kv_heads
            if not comp.excludes:  # fastgen may keep less than the cap
                assert int(layer.lengths.sum()) == n * spec.kv_heads
            # paged (or dense, where padding costs less than pages): under one page of slack per head
            slack = spec.kv_heads * (BLOCK - 1)
            entries = int(layer.lengths.sum()) / spec.kv_heads
            paged = isinstance(layer, RaggedLayer)
            table = 4 * spec.kv_heads * (-(-int(layer.lengths.max()) // BLOCK)) if paged else 0
            assert expected_bytes(entries, spec) <= layer.nbytes() - table
            assert layer.nbytes() - table <= expected_bytes(entries + slack / spec.kv_heads, spec)
            continue
        assert layer.lengths.tolist() == [[n] * spec.kv_heads]
        assert layer.capacity == n  # storage really shrank, no masked slack
        assert layer.nbytes() == expected_bytes(n, spec, slot_states=len(layer.entry_states))
    stats = cache.stats()
    assert stats.tokens_full == 80 and abs(stats.tokens_kept - keep) <= 1
    assert stats.bytes_full == 80 * spec.bytes_per_token
    if name not in HEADWISE:  # (head-wise: bounded per layer above, entries plus under a page per head)
        assert stats.bytes_kept < stats.bytes_full * (1 - ratio) * 1.1


@pytest.mark.parametrize("name", EVICTION)
def test_kept_entries_keep_original_positions(llama, name):
    ids = prompt_ids(64, seed=3)
    full = engine_for(llama, "none")
    comp = engine_for(llama, name, ratio=0.5)
    with full.adapter.attached():
        ref, _ = full.prepare(Segments(ids, []))
        cache, _ = comp.prepare(Segments(ids, []))
    for ref_layer, layer in zip(ref.layers, cache.layers):
        keys, values, positions = layer.view()
        ref_keys, ref_values, _ = ref_layer.view()  # full cache: slot == position
        idx = positions.long()
        assert positions.min() >= 0 and positions.max() < 64
        for h in range(keys.shape[1]):
            n = int(layer.lengths[0, h])  # heads of a head-wise method keep different counts
            assert len(set(positions[0, h, :n].tolist())) == n  # no duplicates
            torch.testing.assert_close(keys[0, h, :n], ref_keys[0, h, idx[0, h, :n]])
            torch.testing.assert_close(values[0, h, :n], ref_values[0, h, idx[0, h, :n]])


@pytest.mark.parametrize("name", MERGING + [f"snapkv+{m}" for m in MERGING])
def test_merged_entries_keep_original_positions(llama, name):
    """Merging keeps a subset of positions (unique, original); each kept value is a convex mix of the
    full cache's values, so it stays within their per-channel range."""
    ids = prompt_ids(64, seed=3)
    full = engine_for(llama, "none")
    comp = engine_for(llama, name, ratio=0.5)
    with full.adapter.attached():
        ref, _ = full.prepare(Segments(ids, []))
        cache, _ = comp.prepare(Segments(ids, []))
    for ref_layer, layer in zip(ref.layers, cache.layers):
        _, values, positions = layer.view()
        ref_values = ref_layer.view()[1]
        assert positions.min() >= 0 and positions.max() < 64
        for h in range(values.shape[1]):
            assert len(set(positions[0, h].tolist())) == values.shape[2] == 32
        lo, hi = ref_values.amin(2, keepdim=True), ref_values.amax(2, keepdim=True)
        assert bool((values >= lo - 1e-5).all()) and bool((values <= hi + 1e-5).all())


def hf_greedy_logits(model, ids, steps):
    """Plain transformers decoding with its own cache: logits of the prompt's last token and each step."""
    cache = DynamicCache(config=model.config)
    out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        out = model(token, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.cat(logits)


def slimkv_greedy_logits(engine, ids, steps):
    runner = engine.runner
    cache, last = engine.prepare(Segments(ids, []))
    logits = [last]
    for _ in range(steps):
        token = int(logits[-1].argmax(-1))
        logits.append(runner.forward([runner.row(cache, [token], engine.compressor, "decode")])[:, -1])
    return torch.cat(logits)


@pytest.mark.parametrize("name", [n for n in ALL if n not in QUANT])
def test_ratio_zero_matches_plain_transformers(llama, name):
    ids = prompt_ids(40, seed=1)
    with torch.no_grad():
        ref = hf_greedy_logits(llama, ids, steps=12)
    phase = "both" if name in DECODE else None
    got = slimkv_greedy_logits(engine_for(llama, name, ratio=0.0, phase=phase), ids, steps=12)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_chunked_prefill_matches_one_pass(llama):
    ids = prompt_ids(50, seed=2)
    one = Engine(llama, ToyTokenizer(), prefill_chunk=1000)
    chunked = Engine(llama, ToyTokenizer(), prefill_chunk=7)
    torch.testing.assert_close(slimkv_greedy_logits(chunked, ids, 5), slimkv_greedy_logits(one, ids, 5),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DECODE)
def test_decode_phase_stays_within_budget(llama, name):
    budget = 24
    per_head = name in HEADWISE  # FastGen: the layer's total, each head following its own policy
    engine = engine_for(llama, name, budget=budget, phase="both" if per_head else "decode")
    seen_lengths, fixed_state = [], [0]
    original = engine.compressor.make_room
    heads = engine.adapter.spec.kv_heads

    def spy(layer, ctx, cap):
        room = original(layer, ctx, cap)
        # per head; head-wise: the layer's mean per head (a head may also hold its newest token)
        seen_lengths.append(int(layer.lengths.sum(-1).max()) / heads - 1 if per_head else int(layer.lengths.max()))
        # per-layer state of a fixed size, not per entry (ALISA's latest queries)
        fixed_state.append(ctx.states.nbytes())
        return room

    engine.compressor.make_room = spy
    result = engine.generate(Segments(prompt_ids(20), []), GenerationConfig(max_new_tokens=40, ignore_eos=True))
    assert len(result.token_ids) == 40  # 20 prompt tokens + 40 generated: the budget of 24 is reached
    assert len(seen_lengths) >= 39 * engine.adapter.spec.layers
    assert max(seen_lengths) <= budget
    spec = engine.adapter.spec
    assert result.cache.tokens_kept <= budget
    # bytes: never a slot beyond the budget (capacity only grows, so the end state bounds every step)
    assert result.cache.bytes_kept <= spec.layers * (expected_bytes(budget, spec, slot_states=1) + max(fixed_state))


@pytest.mark.parametrize("name, phase", [("none", None), ("snapkv", None), ("h2o", None), ("streaming_llm", None),
                                         ("h2o", "both"), ("alisa", "both"),
                                         *[(n, None) for n in HEADWISE], ("fastgen", "both")])
def test_batch_of_two_decodes_like_each_alone(llama, name, phase):
    a, b = Segments(prompt_ids(30, seed=4), []), Segments(prompt_ids(45, seed=5), [])
    engine = engine_for(llama, name, ratio=0.5 if name != "none" else None, phase=phase)
    config = GenerationConfig(max_new_tokens=10)
    alone = [engine.generate(s, config).token_ids for s in (a, b)]
    together = [r.token_ids for r in engine.generate_batch([a, b], config)]
    assert together == alone


def test_question_agnostic_compresses_context_only(llama):
    context, question = prompt_ids(60, seed=6), prompt_ids(10, seed=7)
    engine = engine_for(llama, "knorm", ratio=0.5)
    cache, _ = engine.prepare(Segments(context, question))
    assert cache.seen == 70
    assert cache.stats().tokens_kept == 30 + 10  # question appended uncompressed
    positions = cache.layers[0].view()[2][0, 0].tolist()
    assert set(range(60, 70)) <= set(positions)


@pytest.mark.parametrize("name", [n for n in QUANT if not n.startswith("commvq")])  # CommVQ: test_commvq.py
def test_quantizer_keeps_every_entry_in_fewer_bits(llama, name):
    """Every entry stays; bytes per element: the code bits plus float16 scales and zero points
    (group 32 tokens per key channel, 16 channels per value: 0.5 + 1 bits here) plus shared int16
    positions (0.25 bits with 2 heads of 16 channels) and lengths. Full-precision sinks are turned off
    here (their bytes are asserted in test_quant_layouts.py); a mixed-precision method (``high_bits``)
    lands between its low and high widths; kivi2's wide-key layer adds 2 bits per key element there."""
    params = {"group": 32}
    if "sinks" in compressors.method_info(name).params:
        params["sinks"] = 0
    engine = engine_for(llama, name, **params)
    bits = engine.compressor.bits
    high = getattr(engine.compressor, "high_bits", bits)
    cache, _ = engine.prepare(Segments(prompt_ids(256), []))
    spec = engine.adapter.spec
    stats = cache.stats()
    assert stats.tokens_kept == 256
    elements = 256 * spec.layers * spec.kv_heads * 2 * spec.head_dim
    lengths = spec.layers * spec.kv_heads * 8
    # kivi2's calibrated wide-key layers store their keys at twice the bits
    bound = engine.bind(engine.compressor)
    wide = len(bound) if isinstance(bound, frozenset) else 0
    assert wide == getattr(engine.compressor, "wide_keys", 0)
    widened = wide * 256 * spec.kv_heads * spec.head_dim * bits
    if high == bits:
        assert stats.bytes_kept * 8 == elements * (bits + 0.5 + 1 + 0.25) + lengths * 8 + widened
    else:  # per-head int16 positions and a second set of key groups and lengths in the high part
        assert elements * (bits + 1.75) < stats.bytes_kept * 8 < elements * (high + 1.75 + 1)


@pytest.mark.parametrize("evict", HEADWISE)
def test_headwise_methods_refuse_quantizers(evict):
    """A quantized layer needs equal rows; a head-wise method is refused at configuration time."""
    with pytest.raises(compressors.registry.ConfigError, match="same number of entries"):
        compressors.make_compressor(f"{evict}+kivi2", ratio=0.5)


@pytest.mark.parametrize("evict", [n for n in EVICTION if n not in HEADWISE] + MERGING
                         + [f"snapkv+{m}" for m in MERGING])
@pytest.mark.parametrize("name", QUANT)
def test_quantizer_composes_with_every_eviction_method(llama, evict, name):
    engine = Engine(llama, ToyTokenizer(), compressors.make_compressor(f"{evict}+{name}", ratio=0.5))
    result = engine.generate(Segments(prompt_ids(90), []), GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert len(result.token_ids) == 4
    assert abs(result.cache_after_prefill.tokens_kept - 45) <= 1  # (a layer schedule rounds per layer)
    # half the entries, each at `bits` plus under 4 bits of float16 scales, zero points and per-head
    # int16 positions at these tiny sizes (45 entries, 16 channels), against 32-bit dense entries
    # (+ the attention sinks a quantizer keeps in full precision: a dense entry each, and their lengths)
    after, spec = result.cache_after_prefill, engine.adapter.spec
    quantizer = engine.compressor.stages[-1]
    sinks = getattr(quantizer, "sinks", 0)
    sink_bytes = sinks * spec.bytes_per_token + (spec.layers * spec.kv_heads * 8 if sinks else 0)
    assert after.bytes_kept < after.bytes_full / 2 * (quantizer.bits + 4) / 32 + sink_bytes
