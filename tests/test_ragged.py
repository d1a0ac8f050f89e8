"""Ragged (paged) layers and head-wise budgets: bytes follow each head's own count, attention and
rollback are exact, the store round-trips them, batches mix them with dense layers."""

from __future__ import annotations

import pytest
import torch

from slimkv import compressors
from slimkv.cache import CacheSpec, KVLayer, LayerStates, RaggedLayer, Room, SlimCache, kernels
from slimkv.cache.attention import AttentionMeta
from slimkv.cache.ragged import BLOCK, PagedState
from slimkv.compressors import ScoreContext
from slimkv.compressors.allocation import allocate_heads
from slimkv.compressors.eviction.fastgen import FastGenState
from slimkv.engine import Engine, Segments
from slimkv.engine.prompts import punctuation_table
from slimkv.errors import ConfigError
from slimkv.store.codec import decode_cache, encode_cache
from slimkv.store.convert import cache_to_payload, payload_to_cache

from .conftest import ToyTokenizer, prompt_ids

DIM = 16
ENTRY = 2 * DIM * 4 + 4  # float32 key + value + int32 position


def dense_layer(lengths: list[int], seed: int = 0, batch_lengths: list[list[int]] | None = None) -> KVLayer:
    """A dense layer of rows holding ``lengths`` entries (positions 0.. in order, then shuffled keep)."""
    rows = batch_lengths or [lengths]
    g = torch.Generator().manual_seed(seed)
    n = max(max(r) for r in rows)
    batch, heads = len(rows), len(rows[0])
    layer = KVLayer()
    keys = torch.randn(batch, heads, n, DIM, generator=g)
    values = torch.randn(batch, heads, n, DIM, generator=g)
    layer.append(keys, values, torch.arange(n).expand(batch, n), exact=True)
    slots = torch.arange(n).expand(batch, heads, n)
    layer.keep(slots, lengths=torch.tensor(rows))
    return layer


def rows_of(layer: KVLayer) -> list[list[tuple]]:
    """Every row's valid entries as (position, key sum, value sum), for comparing layouts."""
    keys, values, positions = layer.view()
    assert layer.lengths is not None
    out = []
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            n = int(layer.lengths[b, h])
            out.append(list(zip(positions[b, h, :n].tolist(), keys[b, h, :n].sum(-1).tolist(),
                                values[b, h, :n].sum(-1).tolist())))
    return out


def test_ragged_heads_cost_their_own_entries_plus_under_a_page():
    dense = dense_layer([10, 40])
    ragged = RaggedLayer.from_layer(dense)
    pages = 2 + 5  # ceil(10 / 8) + ceil(40 / 8)
    assert ragged.nbytes() == pages * BLOCK * ENTRY + 2 * 8 + 2 * 5 * 4  # pool + lengths + page table
    assert ragged.nbytes() < (50 + 2 * BLOCK) * ENTRY + 64  # ~50 entries plus bounded slack ...
    assert dense.nbytes() == 80 * ENTRY + 2 * 8  # ... where the dense layout pays for 80
    assert rows_of(ragged) == rows_of(dense)


def test_attention_over_pages_equals_dense_rows():
    dense = dense_layer([9, 33, 20])
    ragged = RaggedLayer.from_layer(dense)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, 6, 3, DIM, generator=g)  # 2 query heads per KV head, 3 tokens
    qpos = torch.tensor([[40, 41, 42]])
    for want_mass in (False, True):
        out_d, mass_d = dense.attend(query, AttentionMeta(qpos, 0, 0.25, key_mass=want_mass))
        out_r, mass_r = ragged.attend(query, AttentionMeta(qpos, 0, 0.25, key_mass=want_mass))
        assert torch.equal(out_d, out_r)
        if want_mass:
            valid = dense.valid_mask()
            assert torch.equal(mass_d[valid], mass_r[valid])


def test_decode_growth_takes_pages_only_as_rows_fill():
    ragged = RaggedLayer.from_layer(dense_layer([3, 17]))
    dense = dense_layer([3, 17])
    g = torch.Generator().manual_seed(2)
    for step in range(20):
        k, v = torch.randn(1, 2, 1, DIM, generator=g), torch.randn(1, 2, 1, DIM, generator=g)
        for layer in (ragged, dense):
            layer.append(k, v, torch.tensor([[100 + step]]))
        lengths = ragged.lengths[0].tolist()
        pages = sum(-(-n // BLOCK) for n in lengths)
        assert ragged.keys.shape[0] == pages  # exactly the pages the entries need
    assert lengths == [23, 37]
    assert rows_of(ragged) == rows_of(dense)


def test_replace_evicts_within_pages():
    ragged = RaggedLayer.from_layer(dense_layer([8, 12]))
    before = ragged.keys.shape[0]
    k, v = torch.ones(1, 2, 1, DIM), torch.ones(1, 2, 1, DIM)
    ragged.replace(Room(torch.tensor([[5, 0]]), torch.tensor([[True, False]])), k, v, torch.tensor([[50]]))
    assert ragged.lengths.tolist() == [[8, 13]]
    assert ragged.keys.shape[0] == before  # head 0 overwrote a slot, head 1 had room in its last page
    _, _, positions = ragged.view()
    assert positions[0, 0, 5] == 50 and positions[0, 1, 12] == 50


def test_rollback_restores_the_marked_rows():
    cache = SlimCache(CacheSpec(layers=1, kv_heads=2, head_dim=DIM, dtype=torch.float32))
    cache.layers, cache.seen = [RaggedLayer.from_layer(dense_layer([5, 30]))], 40
    before = rows_of(cache.layers[0])
    mark = cache.mark()
    layer = cache.layers[0]
    for step in range(11):
        layer.append(torch.randn(1, 2, 1, DIM), torch.randn(1, 2, 1, DIM), torch.tensor([[40 + step]]))
    cache.rollback(mark, keep=0)
    assert cache.layers[0].lengths.tolist() == [[5, 30]] and cache.seen == 40
    assert rows_of(cache.layers[0]) == before


def test_select_tail_keeps_a_tree_path_like_dense_rows():
    ragged, dense = RaggedLayer.from_layer(dense_layer([5, 14])), dense_layer([5, 14])
    mark = ragged.lengths.clone()
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 6, DIM, generator=g), torch.randn(1, 2, 6, DIM, generator=g)
    for layer in (ragged, dense):
        layer.append(k, v, torch.arange(50, 56)[None])
        layer.select_tail(mark, torch.tensor([0, 2, 5]))
    assert ragged.lengths.tolist() == [[8, 17]]
    assert rows_of(ragged) == rows_of(dense)
    _, _, positions = ragged.view()
    assert positions[0, 1, 14:17].tolist() == [50, 52, 55]


def test_store_round_trip_keeps_ragged_layers_ragged():
    cache = SlimCache(CacheSpec(layers=2, kv_heads=2, head_dim=DIM, dtype=torch.float32))
    cache.layers = [RaggedLayer.from_layer(dense_layer([10, 40])), dense_layer([20, 20], seed=3)]
    cache.seen = 64
    back = payload_to_cache(decode_cache(encode_cache(cache_to_payload(cache))), cache.spec)
    assert isinstance(back.layers[0], RaggedLayer) and not isinstance(back.layers[1], RaggedLayer)
    assert [rows_of(layer) for layer in back.layers] == [rows_of(layer) for layer in cache.layers]
    assert back.layers[0].nbytes() == cache.layers[0].nbytes() and back.seen == 64


def test_headwise_ragged_cache_decodes_like_the_same_entries_dense(llama):
    """Exact: greedy logits over paged layers equal those over the same entries stored dense."""
    engine = Engine(llama, ToyTokenizer(), compressors.make_compressor("adasnapkv", ratio=0.6))
    cache, last = engine.prepare(Segments(prompt_ids(70, seed=8), []))
    assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
    dense = cache.clone()
    dense.layers = [layer.to_dense() if isinstance(layer, RaggedLayer) else layer for layer in dense.layers]
    outputs = []
    runner = engine.runner
    for c in (cache, dense):
        token, logits = int(last.argmax(-1)), []
        with kernels.disabled():  # the same attention code reads both layouts (the kernel: test_attention.py)
            for _ in range(8):
                step = runner.forward([runner.row(c, [token], None, "decode")])[:, -1]
                logits.append(step)
                token = int(step.argmax(-1))
        outputs.append(torch.cat(logits))
    assert torch.equal(outputs[0], outputs[1])
    assert cache.stats().bytes_kept < dense.stats().bytes_kept


def test_allocation_gives_spread_heads_more_and_respects_floor_and_total():
    length = 40
    peaked = torch.full((length,), 0.001)
    peaked[:3] = 1.0
    spread = torch.rand(length, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.5
    scores = torch.stack([peaked, spread])[None]  # [1, 2, 40]
    lengths, indices = allocate_heads(scores, torch.tensor([20]), floor=torch.tensor([5]))
    assert int(lengths.sum()) == 20
    assert 5 <= int(lengths[0, 0]) < int(lengths[0, 1])
    assert set(indices[0, 0, :3].tolist()) == {0, 1, 2}  # the peaked head keeps its peak
    scores[0, 1, 10:] = float("-inf")  # never kept, even with room left
    lengths, _ = allocate_heads(scores, torch.tensor([70]), floor=torch.tensor([0]))
    assert lengths.tolist() == [[40, 10]]


def fastgen_layer(sink_head: bool) -> tuple[KVLayer, ScoreContext]:
    """Two KV heads, one query each; head 0's window queries look only at position 0 if ``sink_head``
    (recorded as FastGen's profiling window in the context's states)."""
    n, dim = 40, 4
    keys = torch.zeros(1, 2, n, dim)
    keys[0, :, :, 1] = 1.0
    keys[0, 0, 0] = torch.tensor([10.0, 0, 0, 0])
    layer = KVLayer()
    layer.append(keys, torch.randn(1, 2, n, dim), torch.arange(n)[None], exact=True)
    q = torch.zeros(1, 2, 4, dim)
    q[0, 0, :, 0] = 10.0 if sink_head else 0.0
    ctx = ScoreContext(layer_idx=0, num_layers=1, keep=torch.tensor([20]), seen=torch.tensor([n]),
                       phase="prefill", states=LayerStates())
    state = ctx.states.setdefault(compressors.make_compressor("fastgen", ratio=0.5).state_key, FastGenState)
    state.window.record(q, torch.arange(n - 4, n)[None], 16)
    return layer, ctx


def test_fastgen_picks_the_cheapest_sufficient_policy_per_head():
    comp = compressors.make_compressor("fastgen", ratio=0.5)
    layer, ctx = fastgen_layer(sink_head=True)
    choice, member, _ = comp.policies(layer, ctx)
    assert choice.tolist() == [[0, 4]]  # head 0: special tokens suffice; head 1 (uniform): full
    out = comp.compress(layer, ctx)
    assert isinstance(out, RaggedLayer)
    assert out.lengths.tolist() == [[4, 36]]  # head 0 keeps its 4 sinks, head 1 the rest of the cap
    assert out.nbytes() < layer.nbytes()


def test_fastgen_punctuation_policy_uses_engine_flags():
    comp = compressors.make_compressor("fastgen", ratio=0.5, recovery=0.8)
    layer, ctx = fastgen_layer(sink_head=False)
    flags = torch.zeros(1, 40, dtype=torch.bool)
    flags[0, 10:] = True  # 34 of 40 tokens: ~84% of the uniform attention of head 0
    ctx.states.get(comp.state_key, FastGenState).punct = flags
    choice, member, _ = comp.policies(layer, ctx)
    assert choice[0, 0] == 1 and int(member[0, 0].sum()) == 4 + 30


def test_punctuation_table_from_the_tokenizer():
    table = punctuation_table(ToyTokenizer(), 128)
    text = ToyTokenizer().decode
    assert all(bool(table[i]) == (text([i]).strip() != "" and not text([i]).strip().isalnum())
               for i in range(2, 128) if text([i]).strip().isascii())


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="snapkv", allocation="heads"), "unknown allocation"),
    (dict(name="h2o", allocation="head", phase="decode"), "phase='prefill'"),
    (dict(name="snapkv", allocation="head", floor=1.5), "floor"),
    (dict(name="fastgen", recovery=0.0), "recovery"),
    (dict(name="fastgen", allocation="uniform"), "allocation='head'"),
])
def test_bad_headwise_settings_fail_at_configuration(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        compressors.make_compressor(ratio=0.5, **kwargs)


@pytest.mark.parametrize("name", ["knorm", "streaming_llm", "h2o"])
def test_any_scorer_takes_head_allocation(llama, name):
    engine = Engine(llama, ToyTokenizer(), compressors.make_compressor(name, ratio=0.5, allocation="head"))
    # the question is observed over the (paged) compressed layers
    cache, _ = engine.prepare(Segments(prompt_ids(64, seed=2), prompt_ids(5, seed=3)))
    for layer in cache.layers:
        assert int(layer.lengths.sum()) == 32 * 2 + 5 * 2  # the layer's total, however heads split it
        _, _, positions = layer.view()
        for h in range(2):  # every head holds the question's entries at the end of its row
            n = int(layer.lengths[0, h])
            assert positions[0, h, n - 5 : n].tolist() == list(range(64, 69))



def test_paged_state_accumulates_like_a_dense_tensor():
    """H2O's pattern ``state[:, :, :n] += mass`` on a ragged layer updates exactly the valid slots."""
    dense = dense_layer([3, 12])
    ragged = RaggedLayer.from_layer(dense)
    state = ragged.entry_state(("mass",))
    assert isinstance(state, PagedState) and state.shape == (1, 2, 12)
    mass = torch.arange(24, dtype=torch.float32).view(1, 2, 12)
    state[:, :, :12] += mass
    state[:, :, :12] += mass
    valid = ragged.valid_mask()
    assert torch.equal(state.dense()[valid], 2 * mass[valid])
    ragged.keep(torch.tensor([[[0, 2, 2], [1, 5, 11]]]), lengths=torch.tensor([[2, 3]]))  # state follows
    assert ragged.entry_states[("mass",)].dense()[ragged.valid_mask()].tolist() == [0.0, 4.0, 26.0, 34.0, 46.0]
