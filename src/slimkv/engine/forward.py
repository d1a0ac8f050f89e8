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
    punctuation: [batch, tokens] bool, which new tokens are punctuation (for observers with
                 ``needs_punctuation``; None when none needs it)
    observers: methods that record what they need during this pass (default: the compressor).
               Several observers let one prefill serve several methods (compress once per method,
               prefill once per prompt).
    tree: [tokens, tokens] bool, which of this pass's tokens each one sees, for verifying a token
          tree (``speculative/tree.py``); None = causal by position
    """

    cache: SlimCache
    positions: Tensor
    compressor: Compressor | None = None
    phase: str = "prefill"
    observers: tuple[Compressor, ...] | None = None
    punctuation: Tensor | None = None
    mask_cache: dict = field(default_factory=dict)
    tree: Tensor | None = None

    def __post_init__(self) -> None:
        if self.observers is None:
            self.observers = (self.compressor,) if self.compressor is not None else ()
        self._watching = tuple(o for o in self.observers if o.active(self.phase))

    def _ctx(self, layer_idx: int, extra: int, comp: Compressor | None = None) -> ScoreContext:
        comp = comp or self.compressor
        assert comp is not None
        seen = torch.tensor(self.cache.seen, dtype=torch.long) + extra
        return ScoreContext(
            layer_idx=layer_idx, num_layers=len(self.cache.layers),
            keep=comp.keep_for(seen, layer_idx, len(self.cache.layers)), seen=seen, phase=self.phase,
            punctuation=self.punctuation,
        )

    def _ctx_for(self, layer_idx: int, extra: int) -> ScoreContext:
        """Observation context: the compressor's budget, or the first observer's when there is none."""
        return self._ctx(layer_idx, extra, self.compressor or self._watching[0])

    def attend(
        self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
        sliding_window: int | None, softcap: float | None,
    ) -> Tensor:
        """query [B, Hq, T, D], key/value [B, H, T, D] -> output [B, T, Hq, D]."""
        layer = self.cache.layers[layer_idx]
        layer.scale = scale
        tokens = key.shape[2]
        comp = self.compressor
        room = cap = None
        if comp is not None and self.phase == "decode" and tokens == 1 and comp.active("decode"):
            ctx = self._ctx(layer_idx, 1)
            room, cap = comp.make_room(layer, ctx), int(ctx.keep.max())
        if room is not None:
            layer.replace(room[0], room[1], key, value, self.positions, cap=cap)
        else:
            layer.append(key, value, self.positions, exact=self.phase == "prefill", cap=cap)
        out, mass = layer.attend(
            query, self.positions, scale, tokens, sliding_window=sliding_window, softcap=softcap,
            want_key_mass=any(o.needs_key_mass for o in self._watching), mask_cache=self.mask_cache,
            **({} if self.tree is None else {"tree": self.tree}),
        )
        if self._watching:
            ctx = self._ctx_for(layer_idx, tokens)
            for observer in self._watching:
                observer.observe(layer, ctx, query, self.positions, mass)
        return out.transpose(1, 2)

    def compress(self) -> None:
        """Shrink every layer to the compressor's target for the tokens seen so far."""
        if self.compressor is None or not self.compressor.compresses:
            return
        for i, layer in enumerate(self.cache.layers):
            out = self.compressor.compress(layer, self._ctx(i, 0))
            if out is not None:  # a quantizer hands back the layer that replaces this one
                self.cache.layers[i] = out
