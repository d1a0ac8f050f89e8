"""Lossless decoding on tiny random models: rollback, the dual cache, every compressor, tier failure,
speculative sampling's distribution, lookup drafters and the REST datastore."""

from __future__ import annotations

import logging

import pytest
import torch

import slimkv.speculative.lossless as spec_loop
from slimkv.compressors import make_compressor, method_info, names
from slimkv.engine import Engine, GenerationConfig, LosslessConfig, SamplingConfig, Segments
from slimkv.errors import ConfigError, InputError
from slimkv.speculative.datastore import Datastore, suffix_array
from slimkv.speculative.drafters import NgramIndex
from slimkv.speculative.dual import DiskFullView, FullViewUnavailable, MemoryFullView
from slimkv.speculative.verify import accepts, recovered

from .conftest import ToyTokenizer, prompt_ids, tiny_model

NEW = 24
GREEDY = GenerationConfig(max_new_tokens=NEW, ignore_eos=True)


def lossless(drafter: str = "self", **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=NEW, ignore_eos=True, lossless=LosslessConfig(drafter=drafter, **kw))


@pytest.fixture(scope="module")
def peaked():
    """A tiny llama whose head is scaled so that next-token distributions are peaked (drafts can agree)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def _forward(engine, cache, tokens):
    return engine.runner.forward([engine.runner.row(cache, tokens, None, "decode")], all_logits=True)[0]


def test_rollback_leaves_the_cache_as_if_rejected_tokens_never_existed(llama):
    engine = Engine(llama, ToyTokenizer())
    cache = engine.new_cache()
    engine.prefill(cache, prompt_ids(30))
    before = cache.clone()
    mark = cache.mark()
    _forward(engine, cache, [5, 6, 7, 8, 9])  # pending token + 4 drafts
    cache.rollback(mark, keep=2)  # keep the pending token and one accepted draft
    never = before.clone()
    _forward(engine, never, [5, 6])
    assert cache.seen == never.seen == 32
    for got, want, old in zip(cache.layers, never.layers, before.layers):
        assert torch.equal(got.lengths, want.lengths)
        k, v, p = got.view()
        k2, v2, p2 = want.view()
        assert torch.equal(p, p2)
        n = old.max_length
        assert torch.equal(k[:, :, :n], old.view()[0]) and torch.equal(v[:, :, :n], old.view()[1])
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)
    # the next step sees exactly what a cache that never held the rejected tokens sees
    torch.testing.assert_close(_forward(engine, cache, [10]), _forward(engine, never, [10]))


def test_truncate_refuses_to_grow(llama):
    engine = Engine(llama, ToyTokenizer())
    cache = engine.new_cache()
    engine.prefill(cache, prompt_ids(8))
    layer = cache.layers[0]
    with pytest.raises(ValueError):
        layer.truncate(layer.lengths + 1)


@pytest.mark.parametrize("name", [*names(), "snapkv+kivi2"])
def test_greedy_lossless_equals_full_cache_on_tiny_model(peaked, name):
    """Every compressor, in every phase it supports (decode-phase eviction of the draft view included);
    quantizers (which keep every entry) draft from a quantized view."""
    from slimkv.compressors.quantization.base import Quantizer

    tok = ToyTokenizer()
    reference = Engine(peaked, tok).generate(Segments(prompt_ids(60), []), GREEDY).token_ids
    if isinstance(make_compressor(name), Quantizer):
        comp = make_compressor(name, group=16)
    else:
        phase = "both" if "+" not in name and "decode" in method_info(name).phases and name != "none" else None
        comp = make_compressor(name, ratio=0.875, phase=phase)
    engine = Engine(peaked, tok, comp)
    for drafter in ("self", "prompt", "auto") if name == "h2o" else ("self",):
        result = engine.generate(Segments(prompt_ids(60), []), lossless(drafter))
        assert result.token_ids == reference, (name, drafter)
        assert result.spec.accepted + result.spec.verify_passes == NEW - 1


def test_greedy_lossless_with_a_question_after_compression(peaked):
    tok = ToyTokenizer()
    seg = Segments(prompt_ids(50), prompt_ids(6, seed=3))
    reference = Engine(peaked, tok).generate(seg, GREEDY).token_ids
    result = Engine(peaked, tok, make_compressor("snapkv", ratio=0.75)).generate(seg, lossless("auto"))
    assert result.token_ids == reference
    assert result.prompt_tokens == 56


def test_commit_writes_the_exact_full_kv_into_the_draft_view(peaked):
    from slimkv.engine.prefill import PrefillJob
    from slimkv.engine.sampling import Sampler
    from slimkv.speculative.drafters import DraftRequest, SelfDrafter
    from slimkv.speculative.dual import DualCache

    comp = make_compressor("knorm", ratio=0.5)
    engine = Engine(peaked, ToyTokenizer(), comp)
    ids = prompt_ids(40)
    job = PrefillJob(engine.runner, Segments(ids, []), comp, lossless=True)
    job.run()
    dual = DualCache(job.draft, MemoryFullView(), comp, engine.runner)
    dual.open(job.cache, question=0, room=16)
    before = [layer.max_length for layer in dual.draft.layers]
    pending = int(job.logits.argmax())
    dual.begin()
    draft = SelfDrafter(k=4).propose(DraftRequest(ids + [pending], 4, dual, Sampler(SamplingConfig())))
    assert dual.draft.seen == 44  # the drafts were appended to the draft view ...
    dual.verify([pending, *draft.tokens])
    dual.commit(3)  # ... and only the pending token and two drafts survive, with the full view's KV
    full = dual.full.cache()
    assert full.seen == dual.draft.seen == 43
    for d, f, n in zip(dual.draft.layers, full.layers, before):
        assert d.max_length == n + 3 and f.max_length == 43
        dk, dv, dp = d.view()
        fk, fv, fp = f.view()
        assert torch.equal(dk[:, :, n:], fk[:, :, 40:]) and torch.equal(dv[:, :, n:], fv[:, :, 40:])
        assert torch.equal(dp[:, :, n:], fp[:, :, 40:])
        assert d.nbytes() < f.nbytes()


def test_full_view_on_disk(peaked, tmp_path):
    tok = ToyTokenizer()
    reference = Engine(peaked, tok).generate(Segments(prompt_ids(60), []), GREEDY).token_ids
    engine = Engine(peaked, tok, make_compressor("streaming_llm", ratio=0.875))
    result = engine.generate(Segments(prompt_ids(60), []), lossless("self", full_view=f"disk:{tmp_path}"))
    assert result.token_ids == reference
    assert result.spec.full_view_location == f"disk:{tmp_path}"
    assert result.spec.full_view_bytes >= (60 + NEW - 1) * engine.adapter.spec.bytes_per_token
    assert list(tmp_path.iterdir()) == []  # the files go with the generation


class FailingView(MemoryFullView):
    """A full view whose tier fails after ``reads`` successful reads."""

    def __init__(self, reads: int) -> None:
        super().__init__()
        self.reads = reads

    def cache(self):
        self.reads -= 1
        if self.reads < 0:
            raise FullViewUnavailable("simulated tier failure")
        return super().cache()


@pytest.mark.parametrize("reads", [0, 7])
def test_tier_failure_falls_back_to_full_cache_decoding(peaked, monkeypatch, caplog, reads):
    tok = ToyTokenizer()
    reference = Engine(peaked, tok).generate(Segments(prompt_ids(60), []), GREEDY).token_ids
    monkeypatch.setattr(spec_loop, "make_full_view", lambda spec: FailingView(reads))
    engine = Engine(peaked, tok, make_compressor("knorm", ratio=0.875))
    with caplog.at_level(logging.WARNING, logger="slimkv.speculative.lossless"):
        result = engine.generate(Segments(prompt_ids(60), []), lossless("self"))
    assert result.spec.fallback
    assert "full view unreadable" in caplog.text
    assert result.token_ids == reference  # never an unverified token, and the same text


def test_disk_view_that_disappears_is_a_tier_failure(peaked, tmp_path):
    view = DiskFullView(tmp_path)
    engine = Engine(peaked, ToyTokenizer())
    cache = engine.new_cache()
    engine.prefill(cache, prompt_ids(10))
    view.open(cache, room=4)
    assert view.cache() is cache
    next(tmp_path.iterdir()).unlink()
    with pytest.raises(FullViewUnavailable):
        view.cache()
    view.close()


# ---------------------------------------------------------------------- speculative sampling
def test_rejection_rule_reproduces_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.2])
    n, counts = 20000, torch.zeros(5)
    draws = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    for d in draws:
        counts[d if accepts(p, q, d, g) else recovered(p, q, g)] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_lossless_sampling_matches_the_full_cache_distribution(peaked):
    """Joint law of the first three sampled tokens, lossless (self-drafts from a tiny budget) vs exact."""
    tok = ToyTokenizer()
    ids = prompt_ids(12, seed=5)
    sampling = dict(temperature=1.0, top_k=3)
    engine = Engine(peaked, tok, make_compressor("streaming_llm", budget=3))
    from slimkv.engine.sampling import Sampler

    probs = Sampler(SamplingConfig(**sampling)).probabilities
    with torch.no_grad():
        def dist(seq):
            return probs(peaked(torch.tensor([seq])).logits[:, -1])[0]

        exact = {}
        p1 = dist(ids)
        for a in p1.nonzero().flatten().tolist():
            p2 = dist(ids + [a])
            for b in p2.nonzero().flatten().tolist():
                p3 = dist(ids + [a, b])
                for c in p3.nonzero().flatten().tolist():
                    exact[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    n, counts, drafted, accepted = 300, {}, 0, 0
    for seed in range(n):
        cfg = GenerationConfig(max_new_tokens=3, ignore_eos=True, sampling=SamplingConfig(seed=seed, **sampling),
                               lossless=LosslessConfig(drafter="self", draft_tokens=2))
        r = engine.generate(Segments(ids, []), cfg)
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        drafted, accepted = drafted + r.spec.drafted, accepted + r.spec.accepted
    assert set(counts) <= set(exact)
    assert 0 < accepted < drafted  # drafts were both accepted and rejected
    # chi-square over cells expecting >= 5 draws; the rest pooled into one cell
    big = [k for k, v in exact.items() if v * n >= 5]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [exact[k] * n for k in big] + [n - sum(exact[k] * n for k in big)]
    cells = [(o, e) for o, e in zip(obs, exp) if e > 0]
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    assert len(cells) >= 4
    assert chi2 < CHI2_999[len(cells) - 1], (chi2, len(cells))


#: chi-square 0.999 quantiles by degrees of freedom (1..30)
CHI2_999 = [0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53,
            36.12, 37.70, 39.25, 40.79, 42.31, 43.82, 45.31, 46.80, 48.27, 49.73, 51.18, 52.62, 54.05,
            55.48, 56.89, 58.30, 59.70]


# ---------------------------------------------------------------------- drafters and datastore
def test_ngram_index_finds_the_most_recent_longest_match():
    index = NgramIndex(1, 3)
    history = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert index.match(history) == (3, 7)  # [1, 2, 3] last seen followed by 7
    assert NgramIndex(1, 3).match([4, 4]) == (1, 1)  # the second 4 follows the first
    assert NgramIndex(1, 3).match([4, 5]) == (0, -1)  # nothing seen before


def test_suffix_array_sorts_suffixes():
    t = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1)).numpy()
    assert suffix_array(t).tolist() == sorted(range(len(t)), key=lambda i: t[i:].tolist())


def test_datastore_round_trip_and_draft(tmp_path):
    store = Datastore.build([[1, 2, 3, 4, 5], [9, 2, 3, 4, 6], [2, 3, 4, 5, 7]], "tok")
    path = tmp_path / "ds.skv"
    store.save(path)
    loaded = Datastore.load(path)
    assert loaded.draft([8, 2, 3], 4) == (2, [4, 5, 7])  # the most frequent path of the continuations
    assert loaded.draft([42], 3) == (0, [])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="not a readable"):
        Datastore.load(path)
    with pytest.raises(ConfigError, match="another tokenizer"):
        loaded.check_tokenizer("other")


def test_rest_drafter_is_lossless_and_accepts_from_its_corpus(peaked, tmp_path):
    from slimkv.speculative.datastore import tokenizer_fingerprint

    tok = ToyTokenizer()
    ids = prompt_ids(30, seed=9)
    reference = Engine(peaked, tok).generate(Segments(ids, []), GREEDY).token_ids
    path = tmp_path / "ds.skv"
    Datastore.build([ids + reference, prompt_ids(200, seed=2)], tokenizer_fingerprint(tok)).save(path)
    engine = Engine(peaked, tok, make_compressor("knorm", ratio=0.875))
    for drafter in (f"rest:{path}", f"auto:{path}"):
        result = engine.generate(Segments(ids, []), lossless(drafter))
        assert result.token_ids == reference
        assert result.spec.accepted >= NEW - 6  # the corpus holds the answer


def test_bad_lossless_settings_are_clear():
    with pytest.raises(ConfigError, match="unknown drafter"):
        LosslessConfig(drafter="medusa")
    with pytest.raises(ConfigError, match="unknown drafter"):
        LosslessConfig(drafter="rest")
    with pytest.raises(ConfigError, match="draft_tokens"):
        LosslessConfig(draft_tokens=0)
    with pytest.raises(ConfigError, match="full_view"):
        LosslessConfig(full_view="redis://x")
