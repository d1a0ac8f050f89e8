"""Share of the entries SnapKV frees that kvmerger merges (vs drops); the diagnostic behind benchmarks/results/kvmerger.md."""
import torch
from slimkv.models import load_model
from slimkv.engine import Engine, Segments
from slimkv.evals.tasks import make_sample
from slimkv.compressors import make_compressor
from slimkv.compressors.base import ScoreContext
from slimkv.compressors.merging.kvmerger import find_runs, KVMergerCompressor
torch.set_num_threads(1)
model, tok = load_model()
for hay in ("noise", "bible"):
  for length in (1000,):
    s = make_sample("needle", tok, length, depth=0.5, haystack=hay)
    snap = make_compressor("snapkv", ratio=0.75)
    eng = Engine(model, tok, snap)
    with eng.adapter.attached():
        cache = eng.new_cache(); eng.prefill(cache, tok.encode(s.context))
    for thr in (0.9, 0.8, 0.5):
        merged = freed = 0
        n = len(cache.layers)
        for i, layer in enumerate(cache.layers):
            seen = torch.tensor(cache.seen)
            ctx = ScoreContext(i, n, snap.keep_for(seen, i, n), seen, "prefill")
            kept, lengths = snap.select(layer, ctx)
            keys, _, pos = layer.view()
            runs = find_runs(keys, pos, None, thr)
            L = keys.shape[2]
            is_kept = torch.zeros_like(pos, dtype=torch.bool).scatter_(-1, kept, True).gather(-1, runs.order)
            idx = torch.arange(L).expand_as(runs.run)
            prev = torch.where(is_kept, idx, -1).cummax(-1).values
            nxt = torch.where(is_kept, idx, L).flip(-1).cummin(-1).values.flip(-1)
            ks = keys.float().gather(2, runs.order[..., None].expand_as(keys))
            t, _ = KVMergerCompressor._nearest(ks, runs.run, idx, prev, nxt, ~is_kept)
            merged += int((t >= 0).sum()); freed += int((~is_kept).sum())
        print(f"{hay} {length} threshold {thr}: {merged}/{freed} freed entries merged ({merged/freed:.1%})")
