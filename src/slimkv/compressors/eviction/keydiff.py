"""KeyDiff: keep the keys least similar to the average key - distinctive entries, no attention needed.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
in Resource-Constrained Environments", arXiv:2504.15364.

Per layer and KV head, the anchor is the mean direction of the kept keys; an entry's score is minus
its key's cosine similarity to that anchor. Keys that look like every other key (repeated filler) go
first; rare ones (a needle in a haystack) stay. Question-agnostic by construction: it needs neither
queries nor attention weights, so it works with fused attention kernels and in the decode phase.
The first ``sinks`` tokens and the last ``window`` tokens are always kept.
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


@register
@dataclass
class KeyDiffCompressor(Compressor):
    """Keys least similar (cosine) to the head's mean key direction, plus sinks and a recent window.

    sinks: initial tokens always kept; window: most recent tokens always kept
    """

    sinks: int = 4
    window: int = 8

    name = "keydiff"
    paper = ("Park et al., KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference "
             "in Resource-Constrained Environments, arXiv:2504.15364")
    supported_phases = ("prefill", "decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.window < 0:
            raise ConfigError(f"keydiff sinks and window must be >= 0, got {self.sinks} and {self.window}")

    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        unit = F.normalize(keys.float(), dim=-1)
        if layer.uniform:
            anchor = unit.mean(dim=2, keepdim=True)
        else:  # free slots hold stale data: average over valid entries only
            valid = layer.valid_mask()[..., None].float()
            anchor = (unit * valid).sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1)
        score = -(unit * F.normalize(anchor, dim=-1)).sum(dim=-1)  # [B, H, L]
        recent = positions >= (ctx.seen.to(positions.device) - self.window)[:, None, None]
        return score.masked_fill(recent | (positions < self.sinks), float("inf"))
