"""KeyDiff keeps the distinctive key among near-duplicates (the needle among repeated filler)."""

from __future__ import annotations

import torch

from slimkv.cache import KVLayer
from slimkv.compressors import ScoreContext, make_compressor


def test_distinctive_key_outranks_repeated_ones():
    n, dim = 40, 8
    gen = torch.Generator().manual_seed(0)
    filler = torch.randn(dim, generator=gen)
    keys = filler + 0.05 * torch.randn(1, 1, n, dim, generator=gen)
    keys[0, 0, 17] = torch.randn(dim, generator=gen)  # the needle
    layer = KVLayer()
    layer.append(keys, torch.zeros_like(keys), torch.arange(n)[None], exact=True)
    comp = make_compressor("keydiff", ratio=0.75, sinks=2, window=4)
    ctx = ScoreContext(layer_idx=0, num_layers=1, keep=torch.tensor([10]), seen=torch.tensor([n]), phase="prefill")
    comp.compress(layer, ctx)
    kept = sorted(layer.view()[2][0, 0].tolist())
    assert len(kept) == 10
    assert 17 in kept and {0, 1, 36, 37, 38, 39} <= set(kept)
