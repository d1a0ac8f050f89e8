"""The step-level engine: requests join and leave a running batch, each with its own settings, in one
KV pool; every request produces what it produces alone."""

from __future__ import annotations

import pytest
import torch

from slimkv.compressors import make_compressor
from slimkv.engine import Engine, GenerationConfig, LosslessConfig, SamplingConfig, Segments
from slimkv.engine.sequence import Sequence, Status
from slimkv.errors import InputError

from .conftest import ToyTokenizer, prompt_ids

NEW = 12
GREEDY = GenerationConfig(max_new_tokens=NEW, ignore_eos=True)

#: the methods the issue names, each in the phases it decodes with
METHODS = {
    "none": lambda: None,
    "snapkv": lambda: make_compressor("snapkv", ratio=0.5),
    "h2o-both": lambda: make_compressor("h2o", budget=24, phase="both"),
    "adasnapkv": lambda: make_compressor("adasnapkv", ratio=0.5),
    "fastgen-both": lambda: make_compressor("fastgen", ratio=0.5, phase="both"),
    "kivi2": lambda: make_compressor("kivi2", group=16),
    "snapkv+kivi2": lambda: make_compressor("snapkv+kivi2", ratio=0.5),
    "commvq2": lambda: make_compressor("commvq2", tokens=256),
}


def run(engine: Engine, seqs: list[Sequence], until=None) -> None:
    """Step until every sequence finished (or ``until()`` holds), checking the pool after every step."""
    while not all(s.finished for s in seqs):
        engine.step()
        pool = engine.scheduler.pool
        assert engine.scheduler.measured_bytes() <= pool.budget
        assert pool.used <= pool.budget
        if until is not None and until():
            return


def alone(engine: Engine, prompt: Segments, config: GenerationConfig, comp) -> list[int]:
    return engine.generate(prompt, config, compressor=comp).token_ids


@pytest.mark.parametrize("name", [*METHODS, "lossless-snapkv"])
def test_a_request_joining_mid_decode_and_one_leaving_early_change_nothing(llama, name):
    """B joins at step 5 of A's decoding; C finishes early (a short budget): every request's greedy
    tokens are those it produces alone."""
    lossless = name == "lossless-snapkv"
    comp = make_compressor("snapkv", ratio=0.875) if lossless else METHODS[name]()
    engine = Engine(llama, ToyTokenizer(), comp, kv_memory=1 << 30)
    config = GenerationConfig(max_new_tokens=NEW, ignore_eos=True,
                              lossless=LosslessConfig() if lossless else None)
    short = GenerationConfig(max_new_tokens=3, ignore_eos=True, lossless=config.lossless)
    a, b, c = (Segments(prompt_ids(n, seed=s), []) for n, s in ((60, 1), (45, 2), (50, 3)))
    want = [alone(engine, a, config, comp), alone(engine, b, config, comp), alone(engine, c, short, comp)]
    sa, sc = engine.submit(a, config, comp), engine.submit(c, short, comp)
    run(engine, [sa], until=lambda: len(sa.ids) >= 5)
    assert not sa.finished and sc.finished  # C left while A decodes
    sb = engine.submit(b, config, comp)
    run(engine, [sa, sb])
    assert [sa.result().token_ids, sb.result().token_ids, sc.result().token_ids] == want


def test_a_cancelled_request_frees_its_kv_that_step_and_the_others_go_on(llama):
    engine = Engine(llama, ToyTokenizer(), make_compressor("snapkv", ratio=0.5), kv_memory=1 << 30)
    a, b = Segments(prompt_ids(60, seed=1), []), Segments(prompt_ids(80, seed=2), [])
    want = alone(engine, a, GREEDY, engine.compressor)
    sa, sb = engine.submit(a, GREEDY), engine.submit(b, GREEDY)
    run(engine, [sa, sb], until=lambda: len(sb.ids) >= 3)
    held = engine.scheduler.pool.held(sb.id)
    assert held > 0
    before = engine.scheduler.measured_bytes()
    engine.scheduler.cancel(sb)
    engine.step()
    assert sb.finished and sb.result().finish_reason == "cancelled"
    assert engine.scheduler.pool.held(sb.id) == 0 and sb.cache is None  # released in the same step
    assert engine.scheduler.measured_bytes() < before
    run(engine, [sa])
    assert sa.result().token_ids == want
    assert len(sb.result().token_ids) < NEW


def test_seeded_sampling_does_not_depend_on_the_batch(llama):
    engine = Engine(llama, ToyTokenizer(), kv_memory=1 << 30)
    sampled = GenerationConfig(max_new_tokens=NEW, ignore_eos=True,
                               sampling=SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, seed=7))
    prompt = Segments(prompt_ids(40, seed=5), [])
    want = alone(engine, prompt, sampled, None)
    others = [engine.submit(Segments(prompt_ids(30 + i, seed=9 + i), []),
                            GenerationConfig(max_new_tokens=NEW, ignore_eos=True,
                                             sampling=SamplingConfig(temperature=0.8, seed=i)))
              for i in range(3)]
    mine = engine.submit(prompt, sampled)
    run(engine, [*others, mine])
    assert mine.result().token_ids == want
    assert len({tuple(s.result().token_ids) for s in others}) == 3


def test_mixed_compressors_share_steps_and_keep_their_own_bytes(llama):
    """A full-cache row, snapkv@0.75, kivi2 and h2o (phase both) decode in the same steps; each row's
    tokens and bytes are what it holds alone."""
    engine = Engine(llama, ToyTokenizer(), kv_memory=1 << 30)
    comps = [None, make_compressor("snapkv", ratio=0.75), make_compressor("kivi2", group=16),
             make_compressor("h2o", budget=24, phase="both")]
    prompts = [Segments(prompt_ids(50 + 7 * i, seed=i), []) for i in range(4)]
    want = [engine.generate(p, GREEDY, compressor=c) for p, c in zip(prompts, comps)]
    seqs = [engine.submit(p, GREEDY, c) for p, c in zip(prompts, comps)]
    batches = []
    while not all(s.finished for s in seqs):
        engine.step()
        batches.append(sum(s.status is Status.RUNNING and not s.finished for s in seqs))
    assert max(batches) == 4  # all four decoded in one step
    for seq, ref in zip(seqs, want):
        got = seq.result()
        assert got.token_ids == ref.token_ids
        assert got.cache == ref.cache  # bytes and entries: exactly what it holds alone
        assert got.cache_after_prefill == ref.cache_after_prefill
    sizes = [r.cache.bytes_kept for r in want]
    assert sizes[1] < sizes[0] and sizes[2] < sizes[0] and sizes[3] < sizes[0]


def test_a_small_pool_parks_requests_and_never_changes_a_token(llama):
    """More requests than the pool holds: admission waits, decode growth parks the newest rows in the
    swap space; the budget holds after every step and every output equals its output alone."""
    comps = [None, make_compressor("h2o", budget=24, phase="both"), make_compressor("kivi2", group=16)]
    prompts = [Segments(prompt_ids(60 + 5 * i, seed=20 + i), []) for i in range(6)]
    config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    free = Engine(llama, ToyTokenizer(), kv_memory=1 << 30)
    want = [free.generate(p, config, compressor=comps[i % 3]).token_ids for i, p in enumerate(prompts)]
    spec = free.adapter.spec
    budget = spec.dense_bytes(60 + 25 + 40) * 2  # about two full requests
    engine = Engine(llama, ToyTokenizer(), kv_memory=budget)
    seqs = [engine.submit(p, config, comps[i % 3]) for i, p in enumerate(prompts)]
    run(engine, seqs)
    assert [s.result().token_ids for s in seqs] == want
    scheduler = engine.scheduler
    assert scheduler.preemptions > 0 and scheduler.pool.peak <= budget
    assert scheduler.swap.parked_bytes == 0  # every parked request came back


def test_requests_that_could_never_run_are_refused_with_what_to_change(llama):
    spec = Engine(llama, ToyTokenizer(), kv_memory=1 << 30).adapter.spec
    small = spec.dense_bytes(100)  # a pool that holds 100 tokens
    engine = Engine(llama, ToyTokenizer(), kv_memory=small)
    with pytest.raises(InputError, match="kv_memory"):  # the full cache's size is known at once
        engine.submit(Segments(prompt_ids(100), []), GREEDY)
    with pytest.raises(InputError, match="prefill_memory"):  # too long for the prefill workspace
        Engine(llama, ToyTokenizer(), prefill_memory=small).submit(Segments(prompt_ids(200), []), GREEDY)
    assert not engine.scheduler.has_work()
    # a compressor's size is known once it compressed: still too large, the request ends with the reason
    seq = engine.submit(Segments(prompt_ids(300), []), GREEDY, make_compressor("snapkv", ratio=0.5))
    run(engine, [seq])
    assert isinstance(seq.error, InputError) and "kv_memory" in str(seq.error)
    assert seq.finish_reason == "error" and engine.scheduler.workspace.used == 0
    # compressed enough, the same prompt runs in the same pool
    ok = engine.submit(Segments(prompt_ids(300), []), GENERATE_FEW, make_compressor("snapkv", budget=40))
    run(engine, [ok])
    assert len(ok.result().token_ids) == 4


GENERATE_FEW = GenerationConfig(max_new_tokens=4, ignore_eos=True)


def test_the_prefill_workspace_holds_the_uncompressed_prompt_outside_the_pool(llama):
    """A compressed request enters the pool when its compressed KV fits: the pool's budget bounds what
    decoding requests hold, the workspace what the one prefilling request holds."""
    spec = Engine(llama, ToyTokenizer(), kv_memory=1 << 30).adapter.spec
    engine = Engine(llama, ToyTokenizer(), kv_memory=spec.dense_bytes(180), prefill_memory=spec.dense_bytes(500) * 2)
    comp = make_compressor("snapkv", budget=32)
    seqs = [engine.submit(Segments(prompt_ids(400, seed=i), []), GREEDY, comp) for i in range(3)]
    peak_running = 0
    while not all(s.finished for s in seqs):
        engine.step()
        peak_running = max(peak_running, len(engine.scheduler.running))
        assert engine.scheduler.workspace_bytes() <= engine.scheduler.workspace.budget
    assert peak_running == 3  # three 400-token prompts in a pool of 180 tokens: each holds 32 (+12)
    assert engine.scheduler.pool.peak <= engine.scheduler.pool.budget
    assert engine.scheduler.workspace.peak >= spec.dense_bytes(400)


def test_decode_growth_slack_is_a_small_block(llama):
    """A row grows by 16 slots at a time: after 8 decode steps a compressed request holds its kept
    entries plus under one block of free slots (was a 64-slot block: 1.26x at 1k tokens, ratio 0.75)."""
    engine = Engine(llama, ToyTokenizer(), make_compressor("snapkv", ratio=0.75), kv_memory=1 << 30)
    result = engine.generate(Segments(prompt_ids(400), []), GenerationConfig(max_new_tokens=9, ignore_eos=True))
    spec = engine.adapter.spec
    kept = result.cache.tokens_kept
    assert kept == 100 + 8
    assert result.cache.bytes_kept <= spec.dense_bytes(kept + 15)


def test_observers_recording_alike_share_one_window(llama):
    """REVIEW.md section 8: snapkv, pyramidkv and adasnapkv observing one prefill, with a last pass
    shorter than the window, record one window of distinct positions (the question's queries once)."""
    engine = Engine(llama, ToyTokenizer())
    observers = tuple(make_compressor(n, ratio=0.5) for n in ("snapkv", "pyramidkv", "adasnapkv"))
    cache = engine.new_cache()
    engine.prefill(cache, prompt_ids(64), observers=observers)
    engine.prefill(cache, prompt_ids(5, seed=1), observers=observers)
    from slimkv.compressors.state import QueryWindow

    keys = {o.state_key for o in observers}
    assert len(keys) == 1
    key = keys.pop()
    for states in cache.states:
        assert states.keys() == [key]
        assert states.get(key, QueryWindow).positions.tolist() == [list(range(53, 69))]


def test_decode_steps_do_not_read_the_device_layer_by_layer(monkeypatch):
    """Host-side counts: a decode step converts as many tensors to Python values with 4 layers as with 2
    (none of them per layer), for the full cache and for decode-phase eviction."""
    from .conftest import tiny_model

    def conversions(layers: int, comp) -> int:
        engine = Engine(tiny_model("llama", num_hidden_layers=layers), ToyTokenizer(), comp, kv_memory=1 << 30)
        cache, logits = engine.prepare(Segments(prompt_ids(40), []))
        runner = engine.runner
        for _ in range(3):  # reach the budget, grow once
            runner.forward([runner.row(cache, [int(logits.argmax())], comp, "decode")])
        counted = [0]
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            original = getattr(torch.Tensor, name)

            def counting(self, *a, _original=original, **kw):
                counted[0] += 1
                return _original(self, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counting)
        runner.forward([runner.row(cache, [5], comp, "decode")])
        monkeypatch.undo()
        return counted[0]

    for comp in (None, make_compressor("h2o", budget=24, phase="both")):
        assert conversions(2, comp) == conversions(4, comp)


def test_the_engine_loop_streams_cancels_and_drains(llama):
    import asyncio
    import threading

    engine = Engine(llama, ToyTokenizer(), make_compressor("snapkv", ratio=0.5), kv_memory=1 << 30)
    prompts = [Segments(prompt_ids(40 + i, seed=i), []) for i in range(3)]
    want = [engine.generate(p, GREEDY).text for p in prompts]
    loop = engine.serve()
    try:
        texts: dict[int, str] = {}

        def client(i: int) -> None:
            handle = loop.submit(prompts[i], GREEDY)
            texts[i] = "".join(handle)
            assert handle.result is not None and handle.result.text == texts[i]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()

        async def async_client() -> str:
            handle = loop.submit(prompts[2], GREEDY)
            return "".join([piece async for piece in handle])

        texts[2] = asyncio.run(async_client())
        for t in threads:
            t.join(timeout=60)
        assert [texts[i] for i in range(3)] == want
        long = loop.submit(Segments(prompt_ids(50, seed=9), []), GenerationConfig(max_new_tokens=400,
                                                                               ignore_eos=True))
        first = next(iter(long))
        long.cancel()
        rest = "".join(long)
        assert long.result.finish_reason == "cancelled" and len(first + rest) < 400
        assert loop.stats()["kv_used"] == 0
    finally:
        loop.close()
