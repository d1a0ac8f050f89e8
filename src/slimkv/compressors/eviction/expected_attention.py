"""Expected Attention: keep the keys that the distribution of future queries is expected to attend to.

Paper: Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution", arXiv:2510.00636 (kvpress's ExpectedAttentionPress).

While the prompt is prefilled, each query head's pre-RoPE queries are summarised by their mean ``mu``
and covariance ``S`` (the first ``sinks`` positions left out: attention-sink queries are outliers).
Our cache and the observed queries are post-RoPE, so a query is rotated back by its own position
first (``ModelAdapter.rope``). A future query at position ``p`` is ``R(p) q``; averaging the rotation
over the next ``future`` positions gives ``R`` (per rotary pair, the mean of ``exp(i w p)``), and the
future queries have mean ``R mu`` and covariance ``R S R^T``. For a Gaussian query the expected
exponentiated logit of key ``k`` is ``exp(s k.R mu + s^2 k^T R S R^T k / 2)`` (``s``: the softmax
scale); normalised over the keys (a softmax) it is the expected attention weight. The score averages
it over the query heads of a GQA group and multiplies it by the value's norm (the key's expected
contribution to the output). The first ``sinks`` positions are always kept.

Question-agnostic by design (the statistics describe the whole prompt, not a question); costs one
``D x D`` covariance per query head and layer while prefilling, no attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...cache import CacheLayer, CacheSpec
from ...cache.vq_codes import rope
from ...errors import ConfigError
from ..base import Compressor, ModelAccess, ScoreContext
from ..registry import register
from ..state import QueryStats


def mean_rotation(inv_freq: Tensor, start: float, count: int) -> Tensor:
    """``[D, D]`` mean of the RoPE rotation matrices of positions ``start .. start + count - 1``."""
    pos = torch.arange(count, dtype=torch.float64) + start
    angles = pos[:, None] * inv_freq.double()[None]  # [count, D/2]
    c, s = angles.cos().mean(0), angles.sin().mean(0)  # [D/2]
    half = inv_freq.numel()
    out = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    idx = torch.arange(half)
    out[idx, idx] = c
    out[idx + half, idx + half] = c
    out[idx, idx + half] = -s
    out[idx + half, idx] = s
    return out


@dataclass(frozen=True)
class RopeTable:
    """A model's RoPE frequencies per layer (what ``bind`` returns)."""

    inv_freq: list[Tensor]  # per layer [D/2]
    scaling: list[float]


@register
@dataclass
class ExpectedAttentionCompressor(Compressor):
    """Expected attention of the future queries' distribution (mean and covariance, RoPE-averaged) x |v|.

    future: query positions ahead averaged over (kvpress's default, 512)
    sinks:  first positions always kept and left out of the query statistics
    covariance: include the queries' covariance term (False: mean query only)
    """

    future: int = 512
    sinks: int = 4
    covariance: bool = True

    name = "expected_attention"
    paper = ("Devoto et al., Expected Attention: KV Cache Compression by Estimating Attention from Future "
             "Queries Distribution, arXiv:2510.00636")
    supported_phases = ("prefill",)
    state_fields = ("sinks",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.future < 1:
            raise ConfigError(f"expected_attention future must be >= 1 position, got {self.future}")
        if self.sinks < 0:
            raise ConfigError(f"expected_attention sinks must be >= 0, got {self.sinks}")

    def bind(self, model: ModelAccess) -> RopeTable:
        """The model's RoPE frequencies (to rotate observed queries back to their pre-RoPE form)."""
        adapter = model.adapter
        ropes = [adapter.rope(i) for i in range(adapter.spec.layers)]
        return RopeTable([r.inv_freq for r in ropes], [r.scaling for r in ropes])

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        return spec.layers * q_heads * 8 * (spec.head_dim + spec.head_dim ** 2 + 1)  # float64 sums

    @staticmethod
    def _rope(ctx: ScoreContext) -> tuple[Tensor, float]:
        table = ctx.bound
        if not isinstance(table, RopeTable):
            raise ConfigError("expected_attention needs the model's RoPE frequencies: run it through an Engine "
                              "(which binds it), or pass compressor.bind(model) as ScoreContext.bound")
        return table.inv_freq[ctx.layer_idx], table.scaling[ctx.layer_idx]

    def observe(self, layer: CacheLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        inv_freq, scaling = self._rope(ctx)
        # pre-RoPE queries [B, Hq, T, D]: rotated back by their own positions
        pre = rope(query.float(), query_positions[:, None, :], -inv_freq).double() / scaling
        use = (query_positions >= self.sinks).to(pre.device)[:, None, :, None].double()  # [B, 1, T, 1]
        pre = pre * use
        # [B, Hq, D], [B, Hq, D, D], [B, 1, 1]
        ctx.states.setdefault(self.state_key, QueryStats).add(pre.sum(dim=2), pre.transpose(-1, -2) @ pre,
                                                              use.sum(dim=2))

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        stats = ctx.states.get(self.state_key, QueryStats)
        if stats is None or stats.total is None or stats.outer is None or stats.count is None:
            raise RuntimeError("expected_attention scores need the prompt's query statistics; no prefill was observed")
        inv_freq, scaling = self._rope(ctx)
        keys, values, positions = layer.view()  # [B, H, L, D], [B, H, L, D], [B, H, L]
        batch, heads, length, dim = keys.shape
        count = stats.count.clamp(min=1.0)  # [B, 1, 1]
        mean = stats.total / count  # [B, Hq, D]
        cov = stats.outer / count[..., None] - mean[..., :, None] * mean[..., None, :]
        scores = []
        for b in range(batch):  # the future positions differ per sequence
            rot = mean_rotation(inv_freq, float(ctx.seen[b]), self.future).to(keys.device)  # [D, D]
            mu = scaling * mean[b] @ rot.T  # [Hq, D]
            k = keys[b].double()  # [H, L, D]
            groups = mu.shape[0] // heads
            mu = mu.view(heads, groups, dim)
            logits = torch.einsum("hgd,hld->hgl", mu, k) * layer.scale  # [H, G, L]
            if self.covariance:
                sigma = (scaling ** 2) * rot @ cov[b] @ rot.T  # [Hq, D, D]
                sigma = sigma.view(heads, groups, dim, dim)
                logits = logits + 0.5 * layer.scale ** 2 * torch.einsum("hld,hgde,hle->hgl", k, sigma, k)
            if not layer.uniform:
                logits = logits.masked_fill(~layer.valid_mask()[b][:, None], float("-inf"))
            weight = logits.softmax(dim=-1).mean(dim=1)  # [H, L]
            scores.append(weight * values[b].double().norm(dim=-1))
        out = torch.stack(scores).float()  # [B, H, L]
        return out.masked_fill(positions < self.sinks, float("inf"))
