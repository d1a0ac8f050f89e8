"""Layer budget schedules: how a compressor's total budget is spread over the model's layers.

``uniform`` gives every layer the same budget. ``pyramid`` (PyramidKV, Cai et al., "PyramidKV:
Dynamic KV Cache Compression based on Pyramidal Information Funneling", arXiv:2406.02069) lets the
budget fall linearly with depth - lower layers spread their attention widely, deeper layers focus on
a few tokens - at the same total: layer 0 gets ``2 - 1/beta`` times the mean budget, the last layer
``1/beta`` times it. A layer can never hold more than the tokens seen; what a capped layer cannot
use is handed to the others in proportion to their share, so the total is kept whenever it fits.

Every compressor takes ``schedule="pyramid"``; ``pyramidkv`` is SnapKV with this schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

SCHEDULES = ("uniform", "pyramid")


def check_schedule(schedule: str, beta: float) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown layer schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if beta < 1:
        raise ConfigError(f"pyramid beta must be >= 1 (the last layer keeps 1/beta of the mean), got {beta}")


def layer_keep(keep: Tensor, seen: Tensor, layer_idx: int, num_layers: int, schedule: str,
               beta: float = 20.0) -> Tensor:
    """Entries layer ``layer_idx`` keeps per row.

    keep: [batch] mean entries per layer (what a uniform schedule gives every layer)
    seen: [batch] tokens seen per row (no layer keeps more)
    Returns [batch] long, >= 1.
    """
    if schedule == "uniform" or num_layers == 1:
        return keep
    return pyramid(keep, seen, num_layers, beta)[layer_idx]


def pyramid(keep: Tensor, seen: Tensor, num_layers: int, beta: float) -> Tensor:
    """Budgets of every layer, [num_layers, batch]: linear in depth, capped at ``seen``, same total."""
    low = 1.0 / beta
    share = torch.linspace(2.0 - low, low, num_layers, dtype=torch.float64)[:, None]  # [L, 1], mean 1
    target = keep.double()[None] * num_layers  # [1, B]
    cap = seen.double()[None].expand(num_layers, -1)
    budget = torch.minimum(share * keep.double()[None], cap)
    for _ in range(num_layers):  # water-filling: give what capped layers cannot hold to the others
        missing = target - budget.sum(dim=0, keepdim=True)
        open_ = budget < cap
        if bool((missing <= 1e-9).all()) or not bool(open_.any()):
            break
        weight = torch.where(open_, share, 0.0)
        extra = missing * weight / weight.sum(dim=0, keepdim=True).clamp(min=1e-12)
        budget = torch.minimum(budget + extra.clamp(min=0), cap)
    return budget.floor().long().clamp(min=1)
