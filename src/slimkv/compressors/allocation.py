"""Head-wise budget allocation: one budget per layer, spent across its KV heads by score (AdaKV).

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", arXiv:2407.11550.

With ``allocation="uniform"`` (the default) every KV head keeps the same ``keep`` entries. With
``allocation="head"`` a layer keeps ``kv_heads * keep`` entries per sequence in total, chosen over
all its heads at once: heads whose attention is concentrated give up entries to heads whose
attention is spread out. Scores of different heads are made comparable first - each head's finite
scores are shifted to start at 0 and divided by their sum, so they sum to 1 like the attention
weights the paper ranks - and every head first keeps its ``floor`` best entries (the paper's
safeguard against starving a head). Entries scored ``+inf`` (observation windows, sinks) come first,
entries scored ``-inf`` are never kept (FastGen excludes entries outside a head's policy that way).

Works with any scoring method (``make_compressor("knorm", ratio=0.5, allocation="head")``,
``--allocation head``); ``adasnapkv`` is SnapKV with it. Prefill phase only: the budget is split once,
on the prompt (FastGen, whose heads follow their own policies while decoding, is the exception). Heads then hold different numbers of entries, so the layer becomes a
:class:`~slimkv.cache.RaggedLayer` (paged) and the difference is saved in bytes, not masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

ALLOCATIONS = ("uniform", "head")


def check_allocation(allocation: str, floor: float, phase: str | None, decodes_per_head: bool = False) -> None:
    """Raise :class:`ConfigError` for an unknown allocation, a floor outside [0, 1], or head-wise
    allocation in the decode phase (unless the method governs each head itself while decoding,
    ``decodes_per_head``: FastGen's policies)."""
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}; valid allocations: {', '.join(ALLOCATIONS)}")
    if not 0.0 <= float(floor) <= 1.0:
        raise ConfigError(
            f"floor must be in [0, 1] (the share of the per-head budget every head keeps), got {floor}"
        )
    if allocation == "head" and phase in ("decode", "both") and not decodes_per_head:
        raise ConfigError(
            "allocation='head' splits a layer's budget across heads once, on the prompt; it does not "
            "evict during decoding - use phase='prefill' (--phase prefill)"
        )


def allocate_heads(scores: Tensor, total: Tensor, floor: Tensor) -> tuple[Tensor, Tensor]:
    """Which entries every head keeps when a sequence's heads share one budget.

    scores: [B, H, L] float, higher = keep; ``-inf`` = never (free slots must be ``-inf``)
    total:  [B] entries the sequence keeps in this layer, over all its heads
    floor:  [B] entries every head keeps before the rest is shared (fewer if it has fewer)
    Returns (lengths [B, H], indices [B, H, k]): row ``(b, h)`` keeps its first ``lengths[b, h]``
    indices (in slot order); later indices repeat the last slot (padding for ``KVLayer.keep``).
    """
    batch, heads, length = scores.shape
    finite = torch.isfinite(scores)
    low = torch.where(finite, scores, torch.inf).amin(dim=-1, keepdim=True)  # [B, H, 1]
    shifted = torch.where(finite, scores - low, 0.0)
    share = shifted / shifted.sum(dim=-1, keepdim=True).clamp(min=1e-30)  # [B, H, L], in [0, 1]
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(length).expand_as(order))
    priority = torch.where(finite, share, scores)
    priority = torch.where(finite & (rank < floor.view(batch, 1, 1)), share + 2.0, priority)
    flat = priority.view(batch, heads * length)
    take = torch.minimum(total.to(flat.device), (flat > -torch.inf).sum(dim=-1))  # [B]
    most = int(take.max())
    chosen = torch.zeros(batch, heads * length, dtype=torch.bool, device=flat.device)
    if most > 0:
        top = flat.topk(most, dim=-1).indices  # [B, most]
        chosen.scatter_(1, top, torch.arange(most, device=flat.device) < take[:, None])
    chosen = chosen.view(batch, heads, length)
    lengths = chosen.sum(dim=-1)  # [B, H]
    k = max(int(lengths.max()), 1)
    slots = torch.arange(length, device=flat.device)
    # chosen slots first, in slot order; then the rest, replaced by the last slot (sorts to the tail)
    indices = torch.where(chosen, slots, length + slots).argsort(dim=-1)[..., :k]
    indices = torch.where(torch.arange(k, device=flat.device) < lengths[..., None], indices, length - 1)
    return lengths, indices
