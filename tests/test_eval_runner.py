"""The evaluation runner on a tiny random model: shared prefill, full-cache pairing, resume."""

from __future__ import annotations

import json

from slimkv.engine import Engine
from slimkv.evals.report import aggregate, load_results, write_report
from slimkv.evals.runner import EvalSample, MethodSpec, Runner

from .conftest import ToyTokenizer


def samples(n=3, length=60):
    out = []
    for i in range(n):
        body = "".join(chr(97 + (i * 7 + j) % 26) for j in range(length))
        out.append(EvalSample(task="toy", length=length, index=i, context=body, question="?Q:",
                              answers=("zz",), depth=(i + 0.5) / n))
    return out


def test_runner_scores_every_method_on_the_same_samples(llama, tmp_path):
    out = tmp_path / "results.jsonl"
    runner = Runner(Engine(llama, ToyTokenizer()), max_new_tokens=4, out=out, run="t")
    methods = [MethodSpec("snapkv", 0.5), MethodSpec("knorm", 0.75)]
    results = runner.evaluate(samples(), methods, question_aware=False)
    assert len(results) == 3 * 3  # none is added
    rows = load_results(out)
    assert {(r["method"], r["ratio"]) for r in rows} == {("none", None), ("snapkv", 0.5), ("knorm", 0.75)}
    kept = {r["method"]: r["bytes_kept"] / r["bytes_full"] for r in rows if r["index"] == 0}
    assert kept["none"] > 1.0 - 1e-9 and kept["knorm"] < kept["snapkv"] < kept["none"]
    cells = aggregate(rows)
    assert all(c.samples == 3 for c in cells)


def test_compressed_answers_match_the_engine_run_alone(llama):
    """Sharing the prefill and decoding every configuration in one batch must not change an answer."""
    from slimkv.compressors import make_compressor
    from slimkv.engine import GenerationConfig, Segments

    tok = ToyTokenizer()
    methods = [MethodSpec("h2o", 0.5), MethodSpec("snapkv", 0.75), MethodSpec("knorm", 0.5),
               MethodSpec("streaming_llm", 0.875), MethodSpec("expected_attention", 0.5)]
    config = GenerationConfig(max_new_tokens=6, stop=("\n",))
    for s in samples(2):
        runner = Runner(Engine(llama, tok), max_new_tokens=6)
        shared = {(r.method, r.ratio, r.question_aware): r.answer
                  for r in runner.evaluate([s], methods, question_aware=(False, True))}
        assert len(shared) == 2 * (len(methods) + 1)
        for m in methods:
            engine = Engine(llama, tok, make_compressor(m.name, ratio=m.ratio))
            ctx, q = tok.encode(s.context), tok.encode(s.question, add_special_tokens=False)
            agnostic = engine.generate(Segments(ctx, q), config)
            assert shared[(m.name, m.ratio, False)] == agnostic.text
            with engine.adapter.attached():  # question-aware: the question is prefilled before compression
                cache = engine.new_cache()
                engine.prefill(cache, ctx)
                logits = engine.prefill(cache, q)
                engine.compress(cache, "prefill")
            aware = engine.continue_from(cache, logits, Segments(ctx + q, []), config)
            assert shared[(m.name, m.ratio, True)] == aware.text


def test_resume_skips_finished_results(llama, tmp_path):
    out = tmp_path / "results.jsonl"
    engine = Engine(llama, ToyTokenizer())
    first = Runner(engine, max_new_tokens=3, out=out, run="t")
    first.evaluate(samples(2), [MethodSpec("knorm", 0.5)], question_aware=True)
    lines = out.read_text().splitlines()
    again = Runner(engine, max_new_tokens=3, out=out, run="t")
    assert again.evaluate(samples(2), [MethodSpec("knorm", 0.5)], question_aware=True) == []
    assert out.read_text().splitlines() == lines
    more = again.evaluate(samples(3), [MethodSpec("knorm", 0.5)], question_aware=True)
    assert {r.index for r in more} == {2}


def test_report_writes_leaderboard_and_plots(llama, tmp_path):
    out = tmp_path / "results.jsonl"
    runner = Runner(Engine(llama, ToyTokenizer()), max_new_tokens=3, out=out, run="t")
    runner.evaluate(samples(2), [MethodSpec("streaming_llm", 0.5), MethodSpec("streaming_llm", 0.75)], False)
    board, pngs = write_report(out, tmp_path / "report")
    text = board.read_text()
    assert "streaming_llm@0.5" in text and "none (full cache)" in text
    assert all(p.exists() and p.stat().st_size > 1000 for p in pngs)
    assert json.loads(out.read_text().splitlines()[0])["run"] == "t"


def test_quantized_and_composed_methods_run_beside_the_batch(llama):
    s = samples(1)[0]
    runner = Runner(Engine(llama, ToyTokenizer()), max_new_tokens=4)
    methods = [MethodSpec("kivi4"), MethodSpec("snapkv+kivi2", 0.5), MethodSpec("knorm", 0.5)]
    results = runner.evaluate([s], methods, question_aware=(False, True))
    assert {r.method for r in results} == {"none", "kivi4", "snapkv+kivi2", "knorm"}
    kept = {(r.method, r.question_aware): r.bytes_kept / r.bytes_full for r in results}
    assert kept[("kivi4", False)] < 0.5 and kept[("snapkv+kivi2", False)] < kept[("kivi4", False)]


def test_a_line_cut_short_is_recomputed(llama, tmp_path):
    out = tmp_path / "results.jsonl"
    engine = Engine(llama, ToyTokenizer())
    Runner(engine, max_new_tokens=3, out=out, run="t").evaluate(samples(1), [MethodSpec("knorm", 0.5)], False)
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:40])  # killed while writing the second result
    again = Runner(engine, max_new_tokens=3, out=out, run="t").evaluate(samples(1), [MethodSpec("knorm", 0.5)], False)
    assert len(again) == 1 and len(load_results(out)) == 2
