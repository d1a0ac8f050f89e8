"""Between the cache the engine owns (:class:`~slimkv.cache.SlimCache`) and storable payloads.

Contract: after compressing a prompt once, the engine calls :func:`cache_to_payload` and stores
``encode_cache(payload)``; a later request decodes it and calls :func:`payload_to_cache` to get a
ready-to-query cache. Only public ``KVLayer`` operations are used. Stored per layer: keys, values,
positions and lengths of the kept entries, plus ``seen`` per sequence. Not stored: compressor
compressor state (``SlimCache.states``, per-entry state) and the softmax ``scale`` (the engine sets
it), so a restored cache can be queried and decoded from, and a decode-phase compressor starts from
fresh state.
"""

from __future__ import annotations

import torch

from ..cache import CacheSpec, KVLayer, RaggedLayer, SlimCache
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
    return CachePayload(layers=layers, seen=[cache.seen])


def payload_to_cache(payload: CachePayload, spec: CacheSpec, device: str | torch.device = "cpu") -> SlimCache:
    """A :class:`SlimCache` holding exactly the payload's entries.

    Layers whose rows hold different counts come back as a :class:`RaggedLayer` (paged, no padding)
    when pages take fewer bytes than padding (``pages_pay``).
    """
    if len(payload.layers) != spec.layers:
        raise InputError(f"stored cache has {len(payload.layers)} layers, the model has {spec.layers}")
    if len(payload.seen) != 1:
        raise InputError(f"stored cache holds {len(payload.seen)} sequences; a cache holds one")
    cache = SlimCache(spec)
    cache.seen = int(payload.seen[0])
    for i, entries in enumerate(payload.layers):
        keys, values = entries.keys.to(device), entries.values.to(device)
        batch, heads, _, dim = keys.shape
        if heads != spec.kv_heads or dim != spec.head_dim or batch != 1:
            raise InputError(
                f"stored cache layer {i} has [batch={batch}, kv_heads={heads}, head_dim={dim}], expected "
                f"[1, {spec.kv_heads}, {spec.head_dim}]"
            )
        lengths = entries.lengths.to(device)
        layer = KVLayer.from_entries(keys, values, entries.positions.to(device), lengths)
        if lengths.numel() and pages_pay(lengths):  # head-wise budgets: paged again
            cache.layers[i] = RaggedLayer.from_layer(layer)
        else:
            cache.layers[i] = layer
    return cache
