"""Explicit attention (the path that also returns per-entry attention mass) against a dense reference."""

from __future__ import annotations

import pytest
import torch

from slimkv.cache import attention
from slimkv.cache.attention import AttentionMeta, attend_rows


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_decode_kernel_reads_a_batch_of_ragged_rows_like_attention(dtype):
    """One call over several sequences' dense storage (capacity beyond their entries, heads of
    different lengths) gives what attention over each row's own entries gives."""
    from slimkv.cache import kernels

    query = torch.randn(3, 6, 1, 16, dtype=dtype)  # 3 sequences, 2 KV heads of 3 query heads
    if not kernels.dense_available(query, dtype, 3):
        pytest.skip("no C compiler: the kernel is not built")
    gen = torch.Generator().manual_seed(3)
    lengths = [[5, 5], [40, 17], [1, 33]]
    keys = [torch.randn(1, 2, 48, 16, generator=gen).to(dtype) for _ in lengths]  # capacity 48
    values = [torch.randn(1, 2, 48, 16, generator=gen).to(dtype) for _ in lengths]
    got = kernels.dense_decode(query, keys, values, [n for row in lengths for n in row], 0.3)
    for b, row in enumerate(lengths):
        for h, n in enumerate(row):
            q = query[b, 3 * h : 3 * h + 3, 0].float()  # [G, D]
            probs = (q @ keys[b][0, h, :n].float().T * 0.3).softmax(-1)
            want = probs @ values[b][0, h, :n].float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got[b, 3 * h : 3 * h + 3, 0].float(), want, rtol=tol, atol=tol)
