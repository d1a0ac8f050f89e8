"""Explicit attention (the path that also returns per-entry attention mass) against a dense reference."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache.attention import AttentionMeta
from slimkv.cache import attention
from slimkv.cache.attention import attend_rows


def dense(query, keys, values, positions, query_positions, scale):
    """Reference: repeat KV heads, full [T, L] softmax with a position mask; (output, key mass)."""
    groups = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1)
    v = values.repeat_interleave(groups, dim=1)
    pos = positions.repeat_interleave(groups, dim=1)  # [B, Hq, L]
    logits = (query @ k.transpose(-1, -2)) * scale  # [B, Hq, T, L]
    allowed = pos[:, :, None, :] <= query_positions[:, None, :, None]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    mass = probs.sum(dim=2).view(keys.shape[0], keys.shape[1], groups, -1).sum(dim=2)
    return probs @ v, mass


@pytest.mark.parametrize("rows", [8, 13, 256])  # chunks of query rows: aligned, ragged, one chunk
@pytest.mark.parametrize("cached", [0, 5])  # a prompt's first chunk, or a later one over cached entries
def test_key_mass_and_output_match_dense_attention(monkeypatch, rows, cached):
    monkeypatch.setattr(attention, "EXPLICIT_ROWS", rows)
    gen = torch.Generator().manual_seed(0)
    batch, heads, q_heads, tokens, dim = 1, 2, 6, 21, 8
    length = cached + tokens
    query = torch.randn(batch, q_heads, tokens, dim, generator=gen)
    keys = torch.randn(batch, heads, length, dim, generator=gen)
    values = torch.randn(batch, heads, length, dim, generator=gen)
    positions = torch.arange(length)[None, None].expand(batch, heads, length)
    query_positions = torch.arange(cached, length)[None]
    out, mass = attend_rows(query, keys, values, positions, AttentionMeta(query_positions, tokens, 0.3, key_mass=True))
    ref_out, ref_mass = dense(query, keys, values, positions, query_positions, 0.3)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-6)
    # every query's probabilities sum to one: the mass over all entries counts the query rows
    assert float(mass.sum()) == pytest.approx(q_heads * tokens, rel=1e-5)
    # the newest entry is seen only by the last query of each group member
    assert mass[0, :, -1].tolist() == pytest.approx(ref_mass[0, :, -1].tolist(), rel=1e-5)
