"""Prefix reuse through the tiered store (after LMCache): load stored KV instead of recomputing it.

Contract (the engine's prefill calls, per request, in this order, with that request's own
:class:`ReuseStats`):

1. ``load_compressed(context, compressor)`` - question-agnostic requests only: the compressed cache of
   this exact context under this exact compressor, if stored ("compress once, query many"); a hit skips
   both the context's prefill and its compression.
2. otherwise ``load_prefix(cache, ids, whole)`` - append the longest stored run of leading full chunks
   to an empty cache and return how many tokens it covered. A context that a question follows
   (``whole``) may be loaded completely: its last partial chunk is stored under a key chained over the
   whole context. Otherwise at least one token is left to prefill, which computes the last logits;
3. after the rest is prefilled, ``save_prefix(cache, ids, start, whole)`` stores the new chunks
   (before any compression: chunks hold exact, uncompressed KV), and ``save_compressed`` the
   compressed cache.

A failing store never fails a request: the stack turns tier errors and corrupt entries into misses
(with a warning), and this class logs and skips anything else it cannot read or write.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from ..cache import SlimCache
from ..compressors import Compressor
from ..store import ChunkKV, KeySpec, TierStack, cache_to_payload, chunk_keys, payload_to_cache, prompt_key

log = logging.getLogger(__name__)


@dataclass
class ReuseStats:
    """What the store did for one request.

    hit_tokens: prompt tokens whose KV came from the store; miss_tokens: tokens prefilled
    load_s: seconds spent reading and decoding stored KV
    saved_s: estimated prefill seconds avoided (hit tokens at this request's measured prefill rate)
    """

    hit_tokens: int = 0
    miss_tokens: int = 0
    load_s: float = 0.0
    saved_s: float = 0.0


def compressor_codec(comp: Compressor) -> str:
    """A stable description of a compressor and every parameter that changes what it keeps."""
    fields = [f for f in dataclasses.fields(comp) if f.init]
    params = ",".join(f"{f.name}={getattr(comp, f.name)!r}" for f in fields)
    return f"{comp.name}:{params}"


@dataclass
class PrefixStore:
    """The engine's view of a :class:`TierStack`: chunked prefix KV plus compressed contexts.

    stack: the tiers; spec: tenant, model fingerprint, dtype and chunk size of the keys
    Shared by every request of an engine; each call counts into the request's own ``stats``.
    """

    stack: TierStack
    spec: KeySpec

    def for_tenant(self, tenant: str) -> PrefixStore:
        """The same tiers with keys in ``tenant``'s namespace (no other tenant can hit, list or time them)."""
        return PrefixStore(self.stack, dataclasses.replace(self.spec, tenant=tenant, shared_namespace=None))

    # ------------------------------------------------------------------ chunks of the raw prefix
    def load_prefix(self, cache: SlimCache, ids: list[int], stats: ReuseStats, whole: bool = False) -> int:
        """Append stored leading chunks of ``ids`` to the empty one-sequence ``cache``; tokens loaded.

        whole: ``ids`` is a complete context that a question will follow, so its last partial chunk
               may come from the store too (no logits are needed from it); otherwise the last token
               is always left to the prefill, which computes its logits.
        """
        t0 = time.perf_counter()
        chunks: list[ChunkKV] = []
        for key in chunk_keys(ids if whole else ids[:-1], self.spec):
            chunk = self.stack.get_chunk(key)
            if chunk is None or not self._fits(chunk, cache):
                break
            chunks.append(chunk)
        loaded = sum(c.tokens for c in chunks)
        if whole and loaded == len(ids) // self.spec.chunk_size * self.spec.chunk_size and loaded < len(ids):
            tail = self.stack.get_chunk(self._tail_key(ids))
            if tail is not None and self._fits(tail, cache) and tail.tokens == len(ids) - loaded:
                chunks.append(tail)
        if chunks:
            for i, layer in enumerate(cache.layers):
                keys_i = torch.cat([c.keys[i] for c in chunks], dim=1)[None]  # [1, H, T, D]
                values_i = torch.cat([c.values[i] for c in chunks], dim=1)[None]
                positions = torch.cat([c.positions[i][0] for c in chunks])[None]  # [1, T]
                layer.reserve(len(ids))
                layer.append(keys_i.to(cache.spec.dtype), values_i.to(cache.spec.dtype), positions, exact=True)
            cache.seen = sum(c.tokens for c in chunks)
        stats.hit_tokens += cache.seen
        stats.load_s += time.perf_counter() - t0
        return cache.seen

    def _tail_key(self, ids: list[int]):
        """Key of a complete context's last partial chunk (chained over the whole context)."""
        return prompt_key(ids, dataclasses.replace(self.spec, codec="tail"))

    def _fits(self, chunk: ChunkKV, cache: SlimCache) -> bool:
        spec = cache.spec
        ok = (len(chunk.keys) == spec.layers and chunk.keys[0].shape[0] == spec.kv_heads
              and chunk.keys[0].shape[2] == spec.head_dim)
        if not ok:
            log.warning("store: a stored chunk does not match this model's cache shape; ignoring it")
        return ok

    def save_prefix(self, cache: SlimCache, ids: list[int], start: int, whole: bool = False) -> None:
        """Store the chunks of ``ids`` past token ``start`` from the (uncompressed) cache.

        Full chunks always; with ``whole`` also the last partial chunk of a complete context.
        """
        size = self.spec.chunk_size
        spans = [(key, n * size, (n + 1) * size) for n, key in enumerate(chunk_keys(ids, self.spec))]
        if whole and len(ids) % size:
            spans.append((self._tail_key(ids), len(ids) - len(ids) % size, len(ids)))
        for key, lo, hi in spans:
            if lo < start:
                continue
            views = [layer.view() for layer in cache.layers]  # ([1, H, L, D], [1, H, L, D], [1, H, L])
            chunk = ChunkKV(
                keys=[keys[0, :, lo:hi].clone() for keys, _, _ in views],  # [H, C, D]
                values=[values[0, :, lo:hi].clone() for _, values, _ in views],
                positions=[positions[0, :, lo:hi].clone() for _, _, positions in views],
            )
            self.stack.put_chunk(key, chunk)

    # ------------------------------------------------------------------ compressed contexts
    def _compressed_key(self, ids: list[int], comp: Compressor):
        spec = dataclasses.replace(self.spec, codec=compressor_codec(comp))
        return prompt_key(ids, spec)

    def load_compressed(self, cache_spec, ids: list[int], comp: Compressor, stats: ReuseStats) -> SlimCache | None:
        if comp.quantizes:
            return None  # stored caches hold dense entries; quantized contexts are recomputed
        t0 = time.perf_counter()
        payload = self.stack.get_cache(self._compressed_key(ids, comp))
        if payload is None:
            return None
        try:
            cache = payload_to_cache(payload, cache_spec)
        except ValueError as exc:
            log.warning("store: stored compressed context unusable (%s); recomputing", exc)
            return None
        if cache.seen != len(ids):
            log.warning("store: stored compressed context covers %s tokens, expected %d; recomputing",
                        cache.seen, len(ids))
            return None
        stats.hit_tokens += len(ids)
        stats.load_s += time.perf_counter() - t0
        return cache

    def save_compressed(self, cache: SlimCache, ids: list[int], comp: Compressor) -> None:
        if comp.quantizes:
            log.info("store: quantized contexts are not stored (the store keeps dense entries)")
            return
        self.stack.put_cache(self._compressed_key(ids, comp), cache_to_payload(cache))
