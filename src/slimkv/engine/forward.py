"""One forward pass over our cache: where the attention function, the cache and the compressor meet.

For every attention layer of a pass, :meth:`ForwardContext.attend` (called from the attention function
in ``models/adapter.py``) does, in order:

1. decode phase, one new token: ask the compressor for room (``make_room``) and write the token over
   the evicted entry of full rows; otherwise append the new entries to every row;
2. attend over the layer's entries (explicitly, with per-entry attention mass, only for methods
   that need it);
3. let the compressor observe the queries / attention mass (only in its active phases).

The engine then calls :meth:`ForwardContext.compress` after a segment that must be compressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..cache import SlimCache
from ..compressors import Compressor, ScoreContext


@dataclass
class ForwardContext:
    """State of one forward pass.

    cache: the cache the new tokens go into
    positions: [batch, tokens] original positions of the new tokens
    compressor: the active method, or None for the full cache
    phase: "prefill" (prompt segments) or "decode" (generated tokens)
    """

    cache: SlimCache
    positions: Tensor
    compressor: Compressor | None = None
    phase: str = "prefill"
    mask_cache: dict = field(default_factory=dict)

    def _ctx(self, layer_idx: int, extra: int) -> ScoreContext:
        assert self.compressor is not None
        seen = torch.tensor(self.cache.seen, dtype=torch.long) + extra
        return ScoreContext(
            layer_idx=layer_idx, num_layers=len(self.cache.layers),
            keep=self.compressor.keep_for(seen), seen=seen, phase=self.phase,
        )

    def attend(
        self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
        sliding_window: int | None, softcap: float | None,
    ) -> Tensor:
        """query [B, Hq, T, D], key/value [B, H, T, D] -> output [B, T, Hq, D]."""
        layer = self.cache.layers[layer_idx]
        layer.scale = scale
        tokens = key.shape[2]
        comp = self.compressor
        observing = comp is not None and comp.active(self.phase)
        room = None
        if observing and self.phase == "decode" and tokens == 1:
            assert comp is not None
            room = comp.make_room(layer, self._ctx(layer_idx, 1))
        if room is not None:
            layer.replace(room[0], room[1], key, value, self.positions)
        else:
            layer.append(key, value, self.positions, exact=self.phase == "prefill")
        want_mass = observing and comp is not None and comp.needs_key_mass
        out, mass = layer.attend(
            query, self.positions, scale, tokens, sliding_window=sliding_window, softcap=softcap,
            want_key_mass=want_mass, mask_cache=self.mask_cache,
        )
        if observing:
            assert comp is not None
            comp.observe(layer, self._ctx(layer_idx, tokens), query, self.positions, mass)
        return out.transpose(1, 2)

    def compress(self) -> None:
        """Shrink every layer to the compressor's target for the tokens seen so far."""
        if self.compressor is None or not self.compressor.compresses:
            return
        for i, layer in enumerate(self.cache.layers):
            self.compressor.compress(layer, self._ctx(i, 0))
