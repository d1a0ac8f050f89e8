"""FastGen: profile every KV head on the prompt and give it the cheapest policy that suffices.

Paper: Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs",
arXiv:2310.01801.

Profiling uses the attention of the last ``window`` prompt queries (recorded as SnapKV does). For
every KV head (its query heads' attention summed) the candidate policies are, in the paper's order
of cost, each containing the previous one:

1. special: the first ``sinks`` tokens (BOS and attention sinks);
2. + punctuation: tokens whose text is only punctuation (flags given by the engine);
3. + frequent: the ``frequent`` share of the seen tokens that received the most attention;
4. + local: the most recent ``local`` share of the seen tokens;
5. full: every entry.

A head takes the first policy whose entries recover at least ``recovery`` of its attention mass, and
keeps exactly those entries (scores ``-inf`` outside it). Heads therefore keep very different
numbers of entries; the layer becomes a paged :class:`~slimkv.cache.RaggedLayer`, so the bytes
held are those of the kept entries plus less than one page per head.

Budget choice: ``ratio`` (or ``budget``) is a *cap* on each layer's total, ``kv_heads * keep``
entries per sequence. Under the cap every head keeps its whole policy and the cache can be far
smaller than the ratio says; over it, the entries of all policies compete by attention share as in
head-wise allocation (``allocation.py``), special tokens first. A tiny ratio (e.g. 0.01) gives the
uncapped method of the paper; ratio 0 or none compresses nothing, like every method. Prefill phase
only: generated tokens are appended to every head (the paper also applies each head's policy while
generating, which is not done here). Report ``bytes_kept``, not the ratio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...cache import KVLayer
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register
from .snapkv import SnapKVCompressor, window_attention

logger = logging.getLogger(__name__)

PUNCT = "fastgen_punct"


@register
@dataclass
class FastGenCompressor(Compressor):
    """Per-head policy (special, +punctuation, +frequent, +local, full) chosen on the prompt's attention.

    recovery: share of a head's attention (window queries) its policy must keep, in (0, 1]
    sinks:    initial tokens of the special policy
    frequent: share of the seen tokens the frequent (heavy-hitter) policy adds
    local:    share of the seen tokens the local (recent window) policy adds
    window:   prompt queries whose attention profiles the heads
    """

    recovery: float = 0.95
    sinks: int = 4
    frequent: float = 0.1
    local: float = 0.1
    window: int = 16
    allocation: str = "head"
    floor: float = 0.0

    name = "fastgen"
    paper = ("Ge et al., Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs, "
             "arXiv:2310.01801")
    supported_phases = ("prefill",)
    needs_punctuation = True
    excludes = True
    state: ClassVar[str] = "fastgen"  # ``layer.extra`` prefix of the observed window (SnapKV's observe)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation != "head":
            raise ConfigError("fastgen chooses a policy per head; it needs allocation='head' (the default)")
        if not 0.0 < self.recovery <= 1.0:
            raise ConfigError(
                f"fastgen recovery must be in (0, 1] (share of attention kept), got {self.recovery}"
            )
        if self.sinks < 0 or self.window < 1:
            raise ConfigError(f"fastgen needs sinks >= 0 and window >= 1, got {self.sinks}, {self.window}")
        for what, share in (("frequent", self.frequent), ("local", self.local)):
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"fastgen {what} must be a share of the seen tokens in [0, 1], got {share}")

    def observe(self, layer: KVLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        SnapKVCompressor.observe(self, layer, ctx, query, query_positions, key_mass)  # type: ignore[arg-type]
        if ctx.punctuation is not None:  # [B, T] flags of this pass's tokens, kept in position order
            prev = layer.extra.get(PUNCT)
            flags = ctx.punctuation.to(torch.bool)
            if prev is not None and prev.shape[0] == flags.shape[0]:
                flags = torch.cat([prev, flags], dim=1)
            layer.extra[PUNCT] = flags

    def policies(self, layer: KVLayer, ctx: ScoreContext) -> tuple[Tensor, Tensor, Tensor]:
        """Each head's policy: index (0-4, the module docstring's order) [B, H], its entries [B, H, L]
        bool, and the attention mass of every slot [B, H, L] (window queries, summed over the group)."""
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        probs, _ = window_attention(layer, keys, positions, self.state)  # [B, H, G, w, L]
        mass = probs.sum(dim=(2, 3))  # [B, H, L]
        valid = layer.valid_mask() if not layer.uniform else torch.ones_like(mass, dtype=torch.bool)
        seen = ctx.seen.to(positions.device).double()[:, None, None]  # [B, 1, 1]
        pos = positions.long()
        special = (pos < self.sinks) & valid
        punct_set = special
        flags = layer.extra.get(PUNCT)  # [B, tokens seen] bool, by position
        if flags is not None:
            at = flags.gather(1, pos.flatten(1).clamp(max=flags.shape[1] - 1)).view_as(pos)
            punct_set = special | (at & (pos < flags.shape[1]) & valid)
        order = mass.masked_fill(~valid, -1.0).argsort(dim=-1, descending=True, stable=True)
        steps = torch.arange(pos.shape[-1], device=pos.device).expand_as(pos)
        rank = torch.empty_like(pos).scatter_(-1, order, steps)  # 0 = most attended
        frequent = punct_set | ((rank < (seen * self.frequent).ceil()) & valid)
        local = frequent | ((pos >= seen - (seen * self.local).ceil()) & valid)
        sets = torch.stack([special, punct_set, frequent, local, valid])  # [5, B, H, L]
        recovered = (mass[None] * sets).sum(dim=-1) / mass.sum(dim=-1).clamp(min=1e-30)  # [5, B, H]
        enough = recovered >= self.recovery - 1e-6
        enough[-1] = True
        choice = enough.float().argmax(dim=0)  # the first (cheapest) sufficient policy
        member = sets.gather(0, choice[None, ..., None].expand(1, *mass.shape))[0]
        logger.debug("fastgen layer %d heads per policy (special, +punct, +frequent, +local, full): %s",
                     ctx.layer_idx, torch.bincount(choice.flatten(), minlength=5).tolist())
        return choice, member, mass

    def score(self, layer: KVLayer, ctx: ScoreContext) -> Tensor:
        _, member, mass = self.policies(layer, ctx)
        _, _, positions = layer.view()  # [B, H, L]
        scores = mass.masked_fill(~member, float("-inf"))  # outside the policy: never kept
        return scores.masked_fill(member & (positions.long() < self.sinks), float("inf"))
