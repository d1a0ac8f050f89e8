"""Token-tree verification (REST's candidate trees): tree attention equals sequential decoding of each
path, the accepted path's KV is kept exactly, greedy stays lossless, sampling keeps the distribution."""

from __future__ import annotations

import pytest
import torch

from slimkv.compressors import make_compressor
from slimkv.engine import Engine, GenerationConfig, LosslessConfig, SamplingConfig, Segments
from slimkv.engine.sampling import Sampler
from slimkv.speculative.datastore import Datastore, tokenizer_fingerprint
from slimkv.speculative.tree import accept_tree_greedy, accept_tree_sampled, build_tree, depths, visibility

from .conftest import ToyTokenizer, prompt_ids
from .test_lossless import CHI2_999, peaked  # noqa: F401 (a fixture)

#   root(pending) -> 0:5 -> 1:6 -> 4:9
#                        -> 2:7
#                 -> 3:8
TOKENS = [5, 6, 7, 8, 9]
PARENTS = [-1, 0, 0, -1, 1]


def test_tree_shapes():
    assert depths(PARENTS) == [1, 2, 2, 1, 3]
    seen = visibility(PARENTS)
    assert seen[5].tolist() == [True, True, True, False, False, True]  # node 4: root, 0, 1, itself
    assert seen[4].tolist() == [True, False, False, False, True, False]  # node 3 sees only the root
    assert seen.diagonal().all()


def test_build_tree_keeps_the_best_supported_nodes_parents_first():
    conts = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
    tokens, parents = build_tree(conts, 4)
    assert tokens == [1, 6, 2, 5] and parents == [-1, -1, 0, 0]  # [1] x3, [6] x1, [1,2] x2, [1,5] x1
    tokens, parents = build_tree(conts, 100)
    assert len(tokens) == 6 and all(p < i for i, p in enumerate(parents))


def _forward(engine, cache, tokens, positions=None, tree=None):
    row = engine.runner.row(cache, tokens, None, "decode", positions=positions, tree=tree)
    return engine.runner.forward([row], all_logits=True)[0]


@pytest.fixture
def prefilled(llama):
    engine = Engine(llama, ToyTokenizer())
    cache = engine.new_cache()
    engine.prefill(cache, prompt_ids(30))
    return engine, cache


def _path(node):
    out = []
    while node >= 0:
        out.append(node)
        node = PARENTS[node]
    return out[::-1]


def test_tree_pass_equals_decoding_each_path_alone(prefilled):
    engine, cache = prefilled
    base = cache.clone()
    first = cache.seen
    positions = [first, *(first + d for d in depths(PARENTS))]
    tree_logits = _forward(engine, cache, [4, *TOKENS], positions, visibility(PARENTS))
    torch.testing.assert_close(tree_logits[0], _forward(engine, base.clone(), [4])[0])
    for node in range(len(TOKENS)):
        chain = [4, *(TOKENS[i] for i in _path(node))]
        torch.testing.assert_close(tree_logits[node + 1], _forward(engine, base.clone(), chain)[-1],
                                   msg=f"node {node}")


def test_keeping_a_path_leaves_the_cache_as_if_only_it_was_decoded(prefilled):
    engine, cache = prefilled
    never = cache.clone()
    first = cache.seen
    mark = cache.mark()
    positions = [first, *(first + d for d in depths(PARENTS))]
    _forward(engine, cache, [4, *TOKENS], positions, visibility(PARENTS))
    with torch.inference_mode():  # as in DualCache.commit
        cache.rollback(mark, keep=4, select=[0, 1, 2, 5])  # pending, node 0, node 1, node 4
    _forward(engine, never, [4, 5, 6, 9])
    assert cache.seen == never.seen
    for got, want in zip(cache.layers, never.layers):
        assert torch.equal(got.lengths, want.lengths)
        for a, b in zip(got.view(), want.view()):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(_forward(engine, cache, [3]), _forward(engine, never, [3]))


def test_greedy_acceptance_follows_the_verifier():
    vocab = 12
    logits = torch.zeros(len(TOKENS) + 1, vocab)
    for row, want in enumerate([5, 6, 0, 0, 0, 1]):  # root wants 5 (node 0), node 0 wants 6 (node 1)
        logits[row, want] = 1.0
    verdict = accept_tree_greedy(logits, TOKENS, PARENTS)
    assert verdict.path == (0, 1) and verdict.accepted == 2 and verdict.next_token == 0  # node 1's row
    logits[2] = 0
    logits[2, 9] = 1.0  # node 1 now wants 9: node 4 accepted, then node 4's own token
    verdict = accept_tree_greedy(logits, TOKENS, PARENTS)
    assert verdict.path == (0, 1, 4) and verdict.next_token == 1


def test_tree_sampling_keeps_the_verifier_distribution():
    """First emitted token ~ p(root); second, given the first is node 0's token, ~ p(node 0)."""
    vocab = 12
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(TOKENS) + 1, vocab, generator=g) * 1.5
    logits[0, 5] += 1.5  # make the tree's tokens likely enough to be accepted often
    logits[1, 6] += 1.0
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1))
    p = sampler.probabilities(logits)
    n = 6000
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(n):
        v = accept_tree_sampled(logits, TOKENS, PARENTS, sampler)
        emitted = [TOKENS[i] for i in v.path] + [v.next_token]
        first[emitted[0]] += 1
        if emitted[0] == 5:
            second[emitted[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        total = counts.sum()
        keep = probs * total >= 5
        obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
        exp = torch.cat([probs[keep] * total, (probs[~keep] * total).sum()[None]])
        cells = exp > 0
        chi2 = float(((obs[cells] - exp[cells]) ** 2 / exp[cells]).sum())
        assert chi2 < CHI2_999[int(cells.sum()) - 1], chi2


def test_rest_tree_is_lossless_and_beats_its_single_path(peaked, tmp_path):
    """A corpus where, after every 16-token window of the answer, a wrong continuation is twice as
    frequent as the right one: the single most frequent path is rejected, the tree holds both."""
    tok = ToyTokenizer()
    ids = prompt_ids(30, seed=9)
    new = 24
    greedy = GenerationConfig(max_new_tokens=new, ignore_eos=True)
    reference = Engine(peaked, tok).generate(Segments(ids, []), greedy).token_ids
    wrong = [(t + 1) % 50 + 3 for t in reference]  # a continuation that never matches
    text = ids + reference
    docs = [text]
    for i in range(len(ids), len(text)):
        docs += [text[i - 16 : i] + wrong[i - len(ids) : i - len(ids) + 8]] * 2
    path = tmp_path / "ds.skv"
    Datastore.build(docs, tokenizer_fingerprint(tok)).save(path)
    engine = Engine(peaked, tok, make_compressor("snapkv", ratio=0.875))
    accepted = {}
    for nodes in (0, 16):
        cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True,
                               lossless=LosslessConfig(drafter=f"rest:{path}", tree_nodes=nodes))
        result = engine.generate(Segments(ids, []), cfg)
        assert result.token_ids == reference, nodes
        accepted[nodes] = result.spec.accepted
    assert accepted[16] >= new - 6 > 6 > accepted[0], accepted
