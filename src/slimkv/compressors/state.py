"""The typed states compressors record per request and layer (see ``cache/state.py`` for ownership).

- :class:`QueryWindow`: the latest queries of a layer (SnapKV's observation window, ALISA's latest
  queries, FastGen's profiling window, the votes KVMerger, ZipVL and MiniKV borrow from SnapKV);
- :class:`QueryStats`: running sums of pre-RoPE queries (Expected Attention);
- :class:`RandomStream`: a seeded generator's state (the random baseline: the same request draws
  the same choices whatever else runs beside it);
- FastGen's per-head policies live in ``eviction/fastgen.py`` (``FastGenState``), beside the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache import CacheSpec, CompressorState


@dataclass
class QueryWindow(CompressorState):
    """The latest ``width`` queries of a layer and their positions.

    queries: [batch, q_heads, w, head_dim] (RoPE applied); positions: [batch, w]
    """

    queries: Tensor | None = None
    positions: Tensor | None = None

    def record(self, query: Tensor, positions: Tensor, width: int) -> None:
        """Append a pass's queries ``[B, Hq, T, D]`` at ``positions`` [B, T]; keep the last ``width``."""
        q, pos = query, positions
        if self.queries is not None and self.positions is not None:
            q = torch.cat([self.queries, q], dim=2)
            pos = torch.cat([self.positions, pos], dim=1)
        self.queries = q[:, :, -width:].contiguous()
        self.positions = pos[:, -width:].contiguous()


def window_bytes(spec: CacheSpec, q_heads: int, width: int) -> int:
    """Most bytes a :class:`QueryWindow` of ``width`` queries takes over all layers of a model."""
    element = torch.empty((), dtype=spec.dtype).element_size()
    return spec.layers * width * (q_heads * spec.head_dim * element + 8)


@dataclass
class QueryStats(CompressorState):
    """Running sums of a layer's pre-RoPE queries: ``total`` [B, Hq, D], ``outer`` [B, Hq, D, D]
    (both float64) and ``count`` [B, 1, 1] of the queries summed."""

    total: Tensor | None = None
    outer: Tensor | None = None
    count: Tensor | None = None

    def add(self, total: Tensor, outer: Tensor, count: Tensor) -> None:
        if self.total is None or self.total.shape != total.shape:
            self.total, self.outer, self.count = total, outer, count
        else:
            assert self.outer is not None and self.count is not None
            self.total, self.outer, self.count = self.total + total, self.outer + outer, self.count + count


@dataclass
class RandomStream(CompressorState):
    """A seeded generator of one request and layer, stored as its state tensor (so it clones and parks)."""

    rng: Tensor

    @classmethod
    def seeded(cls, seed: int) -> RandomStream:
        return cls(torch.Generator().manual_seed(seed).get_state())

    def rand(self, shape: torch.Size) -> Tensor:
        """Uniform [0, 1) values of ``shape`` (on the CPU); the stream advances."""
        gen = torch.Generator()
        gen.set_state(self.rng)
        out = torch.rand(shape, generator=gen)
        self.rng = gen.get_state()
        return out
