"""SnapKV: the attention of the prompt's last queries (the observation window) picks what to keep.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.

Only the window's queries are kept while prefilling (``window`` x q_heads x head_dim per layer); at
compression time their attention over the layer's keys is computed once, ``[B, Hq, window, L]`` -
never the prompt's full n x n attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...cache import CacheLayer, CacheSpec
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register
from ..state import QueryWindow, window_bytes


@register
@dataclass
class SnapKVCompressor(Compressor):
    """Window-query attention, max-pooled over neighbours, top-k per KV head; the window is kept.

    window: observation window, the last prompt tokens whose queries vote. 16 rather than the
            paper's 32 or kvpress's 64: on the embedded model (1k-token needle, ratio 0.5,
            question-aware) windows 8/16/32/64 retrieved 6/6/4/2 of 6 needles - a window wider than
            the question lets haystack queries outvote it
    kernel: max-pooling kernel over neighbouring positions (odd)
    """

    window: int = 16
    kernel: int = 7

    name = "snapkv"
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, arXiv:2404.14469"
    supported_phases = ("prefill",)
    state_fields = ("window",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ConfigError(f"snapkv window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"snapkv kernel must be an odd number >= 1, got {self.kernel}")

    def observe(self, layer: CacheLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        ctx.states.setdefault(self.state_key, QueryWindow).record(query, query_positions, self.window)

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        return window_bytes(spec, q_heads, self.window)

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        window = ctx.states.get(self.state_key, QueryWindow)
        probs, qpos = window_attention(layer, keys, positions, window)  # [B, H, G, w, L], [B, w]
        batch, heads, length = positions.shape
        votes = probs.mean(dim=(2, 3))  # [B, H, L]
        # pool over neighbouring *positions* (slots may be out of order after decode-phase eviction)
        order = positions.argsort(dim=-1)
        pooled = F.max_pool1d(
            votes.gather(-1, order).view(batch * heads, 1, length),
            self.kernel, stride=1, padding=self.kernel // 2,
        ).view(batch, heads, length)
        scores = torch.empty_like(votes).scatter_(-1, order, pooled)
        in_window = positions >= qpos.min(dim=1).values[:, None, None]
        return scores.masked_fill(in_window, float("inf"))


def window_attention(layer: CacheLayer, keys: Tensor, positions: Tensor,
                     window: QueryWindow | None) -> tuple[Tensor, Tensor]:
    """Attention of observed window queries over the layer's view.

    keys: [B, H, L, D] and positions: [B, H, L] from ``layer.view()``
    window: the queries an observer recorded for this layer (``ctx.states``), None if none was
    Returns probabilities [B, H, G, w, L] (G query heads per KV head, w window queries; free slots and
    entries after a query get 0) and the window's positions [B, w].
    """
    if window is None or window.queries is None or window.positions is None:
        raise RuntimeError("window scores need the observation window; no prefill was observed")
    q, qpos = window.queries, window.positions  # [B, Hq, w, D], [B, w]
    valid = None if layer.uniform else layer.valid_mask()
    return query_attention(q, qpos, keys, positions, layer.scale, valid), qpos


def query_attention(q: Tensor, qpos: Tensor, keys: Tensor, positions: Tensor, scale: float,
                    valid: Tensor | None = None) -> Tensor:
    """Attention probabilities of a few queries over a layer's entries (explicit, float32).

    q: [B, Hq, w, D] queries (RoPE applied) at positions qpos [B, w]; keys [B, H, L, D], positions
    [B, H, L] and valid [B, H, L] bool (None: every slot holds an entry) from the layer.
    Returns [B, H, G, w, L]: G query heads per KV head; free slots and entries after a query get 0.
    """
    batch, heads, length, dim = keys.shape
    groups, w = q.shape[1] // heads, q.shape[2]
    logits = q.reshape(batch, heads, groups * w, dim) @ keys.transpose(-1, -2)
    logits = logits.float().mul_(scale).view(batch, heads, groups, w, length)
    visible = positions[:, :, None, None, :] <= qpos[:, None, None, :, None]  # [B, H, 1, w, L]
    if valid is not None:
        visible = visible & valid[:, :, None, None, :]
    return logits.masked_fill_(~visible, float("-inf")).softmax(dim=-1)
