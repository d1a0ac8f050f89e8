"""KeyDiff: keep the keys least similar to the average key - distinctive entries, no attention needed.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
in Resource-Constrained Environments", arXiv:2504.15364.

Per layer and KV head, the anchor is the mean direction of the kept keys; an entry's score is minus
its key's cosine similarity to that anchor. Keys that look like every other key (repeated filler) go
first; rare ones (a needle in a haystack) stay. Question-agnostic by construction: it needs neither
queries nor attention weights, so it works with fused attention kernels and in the decode phase.
The first ``sinks`` tokens and the last ``window`` tokens are always kept.

``heads="mean"`` (the default here; the paper scores each head on its own, ``heads="each"``) averages
the scores over the KV heads of a layer, so every head of the layer keeps the same tokens - as SnapKV
averages its votes over the query heads of a group. Question-agnostic needle retrieval on real text
(King James Bible haystack, SmolLM2-135M, ratio 0.75) needs it: per head, the needle's digits are
outliers in some heads but not in the mid-layer heads that copy the answer, which drop them; shared
scores keep the tokens that stand out in the layer as a whole everywhere (1k: 20% -> 100%, 2k: 40% ->
100% of the full cache; ``benchmarks/results/floors.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...cache import KVLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register


HEADS = ("mean", "each")


@register
@dataclass
class KeyDiffCompressor(Compressor):
    """Keys least similar (cosine) to the head's mean key direction, plus sinks and a recent window.

    sinks: initial tokens always kept; window: most recent tokens always kept
    heads: "mean" - one score per token, averaged over the layer's KV heads (every head keeps the
           same tokens); "each" - every KV head scores its own keys (the paper)
    """

    sinks: int = 4
    window: int = 8
    heads: str = "mean"

    name = "keydiff"
    paper = ("Park et al., KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference "
             "in Resource-Constrained Environments, arXiv:2504.15364")
    supported_phases = ("prefill", "decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.window < 0:
            raise ConfigError(f"keydiff sinks and window must be >= 0, got {self.sinks} and {self.window}")
        if self.heads not in HEADS:
            raise ConfigError(f"keydiff heads must be one of {', '.join(HEADS)}, got {self.heads!r}")

    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        unit = F.normalize(keys.float(), dim=-1)
        if layer.uniform:
            anchor = unit.mean(dim=2, keepdim=True)
        else:  # free slots hold stale data: average over valid entries only
            valid = layer.valid_mask()[..., None].float()
            anchor = (unit * valid).sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1)
        score = -(unit * F.normalize(anchor, dim=-1)).sum(dim=-1)  # [B, H, L]
        if self.heads == "mean":
            score = _head_mean(score, positions, layer)
        recent = positions >= (ctx.seen.to(positions.device) - self.window)[:, None, None]
        return score.masked_fill(recent | (positions < self.sinks), float("inf"))


def _head_mean(score: Tensor, positions: Tensor, layer: KVLayer) -> Tensor:
    """Average ``score`` [B, H, L] over the KV heads per *token*, returned in each row's slot order.

    Rows hold the same tokens in the same slots until heads evict differently; with shared scores
    they never do, but a cache stacked or restored from elsewhere may, so fall back to matching
    slots by position (entries a row does not hold are left out of the mean).
    """
    if layer.uniform and bool((positions == positions[:, :1]).all()):
        return score.mean(dim=1, keepdim=True).expand_as(score)
    batch, heads, length = score.shape
    valid = layer.valid_mask() if not layer.uniform else torch.ones_like(score, dtype=torch.bool)
    span = int(positions.max()) + 1
    flat = torch.where(valid, positions, span).long()  # [B, H, L]; free slots go to a spill bin
    total = torch.zeros(batch, span + 1, dtype=score.dtype, device=score.device)
    count = torch.zeros_like(total)
    total.scatter_add_(1, flat.view(batch, -1), torch.where(valid, score, 0.0).view(batch, -1))
    count.scatter_add_(1, flat.view(batch, -1), valid.to(score.dtype).view(batch, -1))
    mean = total / count.clamp(min=1)
    return mean.gather(1, flat.view(batch, -1)).view(batch, heads, length)
