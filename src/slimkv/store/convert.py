"""Between the cache the engine owns (:class:`~slimkv.cache.SlimCache`) and storable payloads.

Contract: after compressing a prompt once, the engine calls :func:`cache_to_payload` and stores
``encode_cache(payload)``; a later request decodes it and calls :func:`payload_to_cache` to get a
ready-to-query cache. Only public ``KVLayer`` operations are used. Stored per layer: keys, values,
positions and lengths of the kept entries, plus ``seen`` per sequence. Not stored: compressor
per-entry state (``slot_state``, ``extra``) and the softmax ``scale`` (the engine sets it), so a
restored cache can be queried and decoded from, and a decode-phase compressor starts from fresh state.
"""

from __future__ import annotations

import torch

from ..cache import CacheSpec, RaggedLayer, SlimCache
from ..cache.ragged import pages_pay
from ..errors import InputError
from .codec import CachePayload, LayerEntries


def cache_to_payload(cache: SlimCache) -> CachePayload:
    """The kept entries of every layer of ``cache`` (moved to the CPU; the cache is not modified)."""
    layers = []
    for i, layer in enumerate(cache.layers):
        if not layer.initialized or layer.lengths is None:
            raise InputError(f"cache layer {i} holds no entries yet; store a cache after prefill")
        if layer.quantized:
            raise InputError(f"cache layer {i} is quantized; the store keeps dense entries only")
        keys, values, positions = layer.view()  # [B, H, L, D], [B, H, L, D], [B, H, L]
        layers.append(LayerEntries(keys.cpu(), values.cpu(), positions.cpu(), layer.lengths.cpu()))
    return CachePayload(layers=layers, seen=list(cache.seen))


def payload_to_cache(payload: CachePayload, spec: CacheSpec, device: str | torch.device = "cpu") -> SlimCache:
    """A :class:`SlimCache` holding exactly the payload's entries.

    Layers whose rows hold different counts come back as a :class:`RaggedLayer` (paged, no padding)
    when pages take fewer bytes than padding (``pages_pay``).
    """
    if len(payload.layers) != spec.layers:
        raise InputError(f"stored cache has {len(payload.layers)} layers, the model has {spec.layers}")
    cache = SlimCache(spec, batch=len(payload.seen))
    cache.seen = list(payload.seen)
    for i, (layer, entries) in enumerate(zip(cache.layers, payload.layers)):
        keys, values = entries.keys.to(device), entries.values.to(device)
        batch, heads, cap, dim = keys.shape
        if heads != spec.kv_heads or dim != spec.head_dim or batch != cache.batch:
            raise InputError(
                f"stored cache layer {i} has [batch={batch}, kv_heads={heads}, head_dim={dim}], expected "
                f"[{cache.batch}, {spec.kv_heads}, {spec.head_dim}]"
            )
        # append writes every row in full; then the real per-head positions and lengths are applied
        layer.append(keys, values, torch.zeros(batch, cap, dtype=torch.int32, device=device), exact=True)
        assert layer.positions is not None
        layer.positions.copy_(entries.positions.to(device))
        slots = torch.arange(cap, device=device).expand(batch, heads, cap)
        layer.keep(slots, lengths=entries.lengths.to(device))
        if entries.lengths.numel() and pages_pay(entries.lengths):  # head-wise budgets: paged again
            cache.layers[i] = RaggedLayer.from_layer(layer)
    return cache
