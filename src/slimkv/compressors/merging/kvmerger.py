"""KVMerger: fold runs of near-duplicate adjacent keys into one pivot entry instead of dropping them.

Paper: Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks", arXiv:2407.08454.

Neighbouring tokens often produce almost the same key. Per layer and KV head, the entries of a row
are put in position order and cut into *runs*: a new run starts wherever a key's cosine similarity to
the previous key falls to ``threshold`` or below. Merging happens only inside a run, so only similar
states are ever mixed.

- **Standalone** (``kvmerger`` with a ratio or budget): each run keeps one *pivot*, its entry with
  the most attention from the observation window (SnapKV's votes; without observed queries, the key
  least similar to the head's mean key). Pivots are kept first, best first; if there are more runs
  than the budget, the weakest runs are evicted whole (the paper pairs merging with eviction of the
  rest); if there are fewer, the best remaining entries are kept too.
- **After an eviction method** (``snapkv+kvmerger``): the eviction method chooses what is kept.
- Either way, every freed entry is merged into the nearer (in key distance) of its two neighbouring
  kept entries *of the same run*; a freed entry whose run keeps nothing is dropped.

Gaussian-kernel merging: a kept entry ``p`` that absorbs freed entries ``i`` becomes
``v_p' = (v_p + sum_i w_i v_i) / (1 + sum_i w_i)`` with ``w_i = exp(-|k_p - k_i|^2 / (2 sigma^2))``
(``p`` itself has weight ``exp(0) = 1``), and the same for its key when ``merge_keys``. ``sigma^2`` is
the mean squared key distance of the absorbed entries times ``sigma``: the kernel adapts to how tight
the run is. Positions stay the pivot's. The memory saving is real: freed slots are released
(``KVLayer.keep``); merged entries cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ...cache import CacheLayer, CacheSpec
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..eviction.snapkv import SnapKVCompressor
from ..registry import register
from ..state import QueryWindow


@dataclass(frozen=True)
class Runs:
    """Entries of every row in position order, cut into runs of similar adjacent keys.

    order: [B, H, L] slot of the i-th entry in position order (free slots last)
    run:   [B, H, L] run id of the i-th entry in position order (non-decreasing along a row)
    """

    order: Tensor
    run: Tensor


def find_runs(keys: Tensor, positions: Tensor, valid: Tensor | None, threshold: float) -> Runs:
    """Runs of consecutive entries (by position) whose adjacent keys have cosine similarity > threshold.

    keys: [B, H, L, D]; positions: [B, H, L]; valid: [B, H, L] bool or None (every slot valid)
    Free slots sort last and each forms a run of its own.
    """
    big = torch.iinfo(torch.int32).max
    pos = positions if valid is None else positions.masked_fill(~valid, big)
    order = pos.argsort(dim=-1)  # [B, H, L]
    ks = keys.float().gather(2, order[..., None].expand_as(keys))  # [B, H, L, D] in position order
    unit = F.normalize(ks, dim=-1)
    similar = (unit[:, :, 1:] * unit[:, :, :-1]).sum(dim=-1) > threshold  # [B, H, L-1]
    if valid is not None:
        similar &= valid.gather(-1, order)[:, :, 1:]
    start = torch.cat([torch.ones_like(similar[:, :, :1]), ~similar], dim=-1)  # [B, H, L]
    return Runs(order=order, run=start.long().cumsum(dim=-1) - 1)


@register
@dataclass
class KVMergerCompressor(Compressor):
    """Merge runs of similar adjacent keys into one pivot each (Gaussian-kernel weights).

    threshold:  adjacent keys with cosine similarity above this share a run (may be merged); in
                [-1, 1]; 1 disables merging (plain eviction), -1 lets a freed entry merge into its
                nearest kept neighbour whatever its key
    merge_keys: merge keys as well as values (the paper does); False keeps the pivot's key as is
    sigma:      kernel width as a multiple of the absorbed entries' mean squared key distance (> 0)
    window, kernel: SnapKV's observation window and pooling kernel (picking pivots)
    """

    threshold: float = 0.9
    merge_keys: bool = True
    sigma: float = 1.0
    window: int = 16
    kernel: int = 7
    _votes: SnapKVCompressor = field(init=False, repr=False, compare=False)

    name = "kvmerger"
    kind = "merging"
    paper = ("Wang et al., Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on "
             "Long-Context Tasks, arXiv:2407.08454")
    supported_phases = ("prefill",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(
                f"kvmerger threshold is a cosine similarity and must be in [-1, 1], got {self.threshold} "
                "(1 merges nothing, lower values merge more)"
            )
        if not float(self.sigma) > 0:
            raise ConfigError(f"kvmerger sigma (the Gaussian kernel width) must be > 0, got {self.sigma}")
        self._votes = SnapKVCompressor(window=self.window, kernel=self.kernel)  # validates window, kernel

    # ------------------------------------------------------------------ standalone: pivots first
    def recorders(self, phase: str) -> list[Compressor]:
        """SnapKV's observation window (shared with a SnapKV stage of the same window)."""
        return [self._votes] if self.active(phase) else []

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        return self._votes.state_bytes(spec, q_heads, tokens)

    def importance(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        """Attention from the observation window, or (nothing observed) distinctiveness: [B, H, L]."""
        if ctx.states.get(self._votes.state_key, QueryWindow) is not None:
            return self._votes.score(layer, ctx)
        keys, _, positions = layer.view()
        unit = F.normalize(keys.float(), dim=-1)
        valid = layer.valid_mask()[..., None].float()
        anchor = F.normalize((unit * valid).sum(dim=2, keepdim=True), dim=-1)
        recent = positions >= (ctx.seen.to(positions.device) - self.window)[:, None, None]
        return (-(unit * anchor).sum(dim=-1)).masked_fill(recent, float("inf"))

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        """Every run's pivot above every other entry, each group by importance: [B, H, L] in [0, 3]."""
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        valid = None if layer.uniform else layer.valid_mask()
        runs = find_runs(keys, positions, valid, self.threshold)
        imp = self.importance(layer, ctx).float().gather(-1, runs.order)  # position order
        if valid is not None:
            imp = imp.masked_fill(~valid.gather(-1, runs.order), float("-inf"))
        length = imp.shape[-1]
        best = torch.full_like(imp, float("-inf")).scatter_reduce(-1, runs.run, imp, "amax")
        idx = torch.arange(length, device=imp.device).expand_as(runs.run)
        candidate = torch.where(imp == best.gather(-1, runs.run), idx, length)
        first = torch.full_like(runs.run, length).scatter_reduce(-1, runs.run, candidate, "amin")
        pivot = idx == first.gather(-1, runs.run)  # one pivot per run (the first best on ties)
        rank = imp.argsort(dim=-1).argsort(dim=-1).float() / length  # [0, 1), order of importance
        key = torch.where(imp == float("inf"), 3.0, rank + pivot.float())
        return torch.empty_like(key).scatter_(-1, runs.order, key)

    # ------------------------------------------------------------------ merging the freed entries
    def merge(self, layer: CacheLayer, ctx: ScoreContext, kept: Tensor, lengths: Tensor | None) -> None:
        keys, values, positions = layer.view()  # [B, H, L, D], [B, H, L, D], [B, H, L]
        valid = None if layer.uniform else layer.valid_mask()
        runs = find_runs(keys, positions, valid, self.threshold)
        order, run = runs.order, runs.run
        length = keys.shape[2]
        real = torch.ones_like(kept, dtype=torch.int32)
        if lengths is not None:
            real = (torch.arange(kept.shape[-1], device=kept.device) < lengths[..., None]).int()
        is_kept = torch.zeros_like(positions, dtype=torch.int32).scatter_add_(-1, kept, real) > 0
        kept_s = is_kept.gather(-1, order)  # [B, H, L] in position order
        free_s = ~kept_s if valid is None else ~kept_s & valid.gather(-1, order)
        if not bool(free_s.any()):
            return
        idx = torch.arange(length, device=keys.device).expand_as(run)
        prev = torch.where(kept_s, idx, -1).cummax(dim=-1).values  # nearest kept entry before, or -1
        nxt = torch.where(kept_s, idx, length).flip(-1).cummin(dim=-1).values.flip(-1)  # after, or L
        ks = keys.float().gather(2, order[..., None].expand_as(keys))  # position order
        target, dist = self._nearest(ks, run, idx, prev, nxt, free_s)
        merging = target >= 0
        if not bool(merging.any()):
            return
        # Gaussian kernel per target: sigma^2 = sigma * mean squared distance of what it absorbs
        tgt = target.clamp(min=0)
        m = merging.float()
        spread = torch.zeros_like(dist).scatter_add_(-1, tgt, dist * m)
        count = torch.zeros_like(dist).scatter_add_(-1, tgt, m)
        var = (spread / count.clamp(min=1) * float(self.sigma)).gather(-1, tgt).clamp(min=1e-12)
        weight = torch.exp(-dist / (2 * var)) * m  # [B, H, L]; 0 where nothing is merged
        total = 1.0 + torch.zeros_like(weight).scatter_add_(-1, tgt, weight)  # the pivot weighs 1
        slot = order.gather(-1, tgt)  # target slots in storage order
        # new tensors rather than writes in place: the cache's tensors may be inference tensors
        assert layer.keys is not None and layer.values is not None
        layer.values = self._fold(layer.values, values, order, total, slot[..., None], weight[..., None])
        if self.merge_keys:
            layer.keys = self._fold(layer.keys, keys, order, total, slot[..., None], weight[..., None])

    @staticmethod
    def _nearest(ks: Tensor, run: Tensor, idx: Tensor, prev: Tensor, nxt: Tensor,
                 free: Tensor) -> tuple[Tensor, Tensor]:
        """For each freed entry (position order): the nearer kept neighbour of its run, or -1.

        Returns target [B, H, L] (position-order index, -1 = drop) and squared key distance [B, H, L].
        """
        length = ks.shape[2]

        def candidate(j: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
            jj = j.clamp(0, length - 1)
            ok = ok & (run.gather(-1, jj) == run) & free
            d = (ks - ks.gather(2, jj[..., None].expand_as(ks))).pow(2).sum(dim=-1)
            return jj, torch.where(ok, d, float("inf"))

        jp, dp = candidate(prev, prev >= 0)
        jn, dn = candidate(nxt, nxt < length)
        use_prev = dp <= dn
        dist = torch.where(use_prev, dp, dn)
        target = torch.where(dist.isfinite(), torch.where(use_prev, jp, jn), -1)
        return target, torch.where(dist.isfinite(), dist, 0.0)

    @staticmethod
    def _fold(store: Tensor, view: Tensor, order: Tensor, total: Tensor, slot: Tensor,
              weight: Tensor) -> Tensor:
        """``store`` (keys or values, [B, H, capacity, D]) with every kept slot replaced by its weighted mean.

        view: [B, H, L, D] the slots of ``store`` in use; order: [B, H, L] position order -> slot
        total: [B, H, L] (position order) 1 + the weights a target absorbs; slot, weight: [B, H, L, 1]
        (position order) the target slot of each freed entry and its weight (0: not merged)
        """
        x = view.float().gather(2, order[..., None].expand_as(view))  # position order
        absorbed = torch.zeros_like(x).scatter_add_(2, slot.expand_as(x), x * weight)  # storage order
        norm = torch.ones_like(total).scatter_(-1, order, total)  # storage order
        merged = ((view.float() + absorbed) / norm[..., None]).to(store.dtype)
        return torch.cat([merged, store[:, :, view.shape[2]:]], dim=2)
