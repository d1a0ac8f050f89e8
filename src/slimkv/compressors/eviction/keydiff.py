"""KeyDiff: keep the keys least similar to the typical keys - distinctive entries, no attention needed.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
in Resource-Constrained Environments", arXiv:2504.15364.

In the paper, per layer and KV head, the anchor is the mean direction of the kept keys and an entry's
score is minus its key's cosine similarity to that anchor. Keys that look like every other key (repeated filler) go
first; rare ones (a needle in a haystack) stay. Question-agnostic by construction: it needs neither
queries nor attention weights, so it works with fused attention kernels and in the decode phase.
The first ``sinks`` tokens and the last ``window`` tokens are always kept.

Two departures from the paper, both for question-agnostic retrieval on real text (King James Bible
haystack, SmolLM2-135M; numbers in ``benchmarks/results/floors.md``), where per-head scoring with one
mean direction lost the needle (1k / 2k tokens, ratio 0.75: 60% / 30% of the full cache's score):

- ``anchors``: real text is not one cloud of keys around a mean but several (a repeated formula, names,
  punctuation...). The keys of a head are clustered (a few rounds of spherical k-means) and an entry
  scores minus its cosine to the *nearest* centre of a cluster holding a fair share of the entries:
  whatever is typical of any such cluster goes, the outliers of all of them stay (a cluster of a few
  keys is an outlier itself, not a reference). ``anchors=1`` is the paper's single mean direction.
- ``heads="mean"``: the scores are averaged over the KV heads of a layer, so every head of the layer
  keeps the same tokens (as SnapKV averages its votes over the query heads of a group). Per head, the
  needle's digits stand out in some heads but not in the mid-layer heads that copy the answer; shared
  scores keep what stands out in the layer as a whole, in every head. ``heads="each"``: the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...cache import CacheLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register

HEADS = ("mean", "each")
ROUNDS = 5  # k-means rounds: a fixed, small cost (a few [L, anchors] products per layer)


@register
@dataclass
class KeyDiffCompressor(Compressor):
    """Keys least similar (cosine) to their nearest key-cluster centre, plus sinks and a recent window.

    sinks: initial tokens always kept; window: most recent tokens always kept
    heads: "mean" - one score per token, averaged over the layer's KV heads (every head keeps the
           same tokens); "each" - every KV head scores its own keys (the paper)
    anchors: reference directions per KV head (spherical k-means centres of the unit keys); an entry
             scores minus its cosine to the nearest one. 1 = the paper's mean direction
    keys_per_anchor: a row of L entries gets max(anchors, ceil(L / keys_per_anchor)) centres
             (0: always ``anchors``; ``anchors=1`` is always the paper's one mean direction)
    """

    sinks: int = 4
    window: int = 8
    heads: str = "mean"
    anchors: int = 4
    keys_per_anchor: int = 512

    name = "keydiff"
    paper = ("Park et al., KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference "
             "in Resource-Constrained Environments, arXiv:2504.15364")
    supported_phases = ("prefill", "decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.window < 0:
            raise ConfigError(f"keydiff sinks and window must be >= 0, got {self.sinks} and {self.window}")
        if isinstance(self.anchors, bool) or int(self.anchors) != self.anchors or self.anchors < 1:
            raise ConfigError(f"keydiff anchors must be a whole number >= 1, got {self.anchors}")
        if (isinstance(self.keys_per_anchor, bool) or int(self.keys_per_anchor) != self.keys_per_anchor
                or self.keys_per_anchor < 0):
            raise ConfigError(f"keydiff keys_per_anchor must be a whole number >= 0, got {self.keys_per_anchor}")
        if self.heads not in HEADS:
            raise ConfigError(f"keydiff heads must be one of {', '.join(HEADS)}, got {self.heads!r}")

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        unit = F.normalize(keys.float(), dim=-1)
        # free slots hold stale data: they take no part in the centres
        valid = None if layer.uniform else layer.valid_mask()
        score = -nearest_centre(unit, valid, self.centres(unit.shape[2]))  # [B, H, L]
        if self.heads == "mean":
            score = _head_mean(score, positions, layer)
        recent = positions >= (ctx.seen.to(positions.device) - self.window)[:, None, None]
        return score.masked_fill(recent | (positions < self.sinks), float("inf"))

    def centres(self, length: int) -> int:
        """Reference directions for a row of ``length`` slots."""
        if self.anchors == 1 or not self.keys_per_anchor:
            return int(self.anchors)
        return max(int(self.anchors), -(-length // int(self.keys_per_anchor)))


def _head_mean(score: Tensor, positions: Tensor, layer: CacheLayer) -> Tensor:
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


def nearest_centre(unit: Tensor, valid: Tensor | None, anchors: int) -> Tensor:
    """Cosine of every key to the nearest of ``anchors`` centres of its row.

    unit: [B, H, L, D] unit-norm keys; valid: [B, H, L] bool (None = every slot holds an entry)
    Returns [B, H, L]. Centres: spherical k-means seeded with evenly spaced entries of each row
    (deterministic), ``ROUNDS`` rounds, keeping only clusters of at least ``1 / (2 * anchors)`` of
    the row's entries. With ``anchors=1`` the one centre is the normalised mean of the valid keys.
    """
    weight = None if valid is None else valid[..., None].to(unit.dtype)  # [B, H, L, 1]
    if anchors == 1:
        total = unit.sum(dim=2, keepdim=True) if weight is None else (unit * weight).sum(dim=2, keepdim=True)
        return (unit * F.normalize(total, dim=-1)).sum(dim=-1)
    batch, heads, length, dim = unit.shape
    count = torch.full((batch, heads), length, device=unit.device) if valid is None else valid.sum(dim=-1)
    seeds = torch.arange(anchors, device=unit.device) * (count[..., None] - 1).clamp(min=0)
    seeds = torch.div(seeds, anchors - 1, rounding_mode="floor")  # [B, H, C] slots of the seeds
    centres = unit.gather(2, seeds[..., None].expand(-1, -1, -1, dim))  # [B, H, C, D]
    for _ in range(ROUNDS):
        member = F.one_hot((unit @ centres.transpose(-1, -2)).argmax(dim=-1), anchors).to(unit.dtype)
        if weight is not None:
            member = member * weight  # [B, H, L, C]
        sums = member.transpose(-1, -2) @ unit  # [B, H, C, D]
        # an empty cluster keeps its centre
        centres = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1), centres)
    # A cluster of a few entries is itself an outlier (k-means readily gives a rare key a centre of
    # its own): only clusters holding at least half an even share of the row are typical.
    # The largest cluster always qualifies.
    sim = unit @ centres.transpose(-1, -2)  # [B, H, L, C]
    member = F.one_hot(sim.argmax(dim=-1), anchors).to(unit.dtype)
    if weight is not None:
        member = member * weight
    typical = member.sum(dim=2) >= count[..., None] / (2 * anchors)  # [B, H, C]
    return sim.masked_fill(~typical[:, :, None, :], float("-inf")).amax(dim=-1)
