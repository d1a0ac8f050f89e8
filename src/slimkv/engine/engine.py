"""The engine: a model, a compressor and (optionally) a KV store; prefill and compression per request.

Order of work for a request (see ``prompts.Request``; steps 1-3 here, step 4 in ``loop.py``):

1. prefill the context in chunks of ``prefill_chunk`` tokens into a fresh :class:`SlimCache`;
2. compress it (prefill phase: question-agnostic when a question follows);
3. prefill the question, if any (compressed again only in the decode phase, to keep the budget);
4. decode one token per step for every sequence of the batch, evicting as the decode phase asks,
   until EOS, a stop string, ``max_new_tokens`` or the model's context length.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from ..cache import SlimCache
from ..compressors import Compressor
from ..errors import ConfigError, InputError
from ..models.adapter import ModelAdapter
from .forward import ForwardContext
from .loop import Generation, ProgressFn
from .prompts import Request, Segments, end_token_ids, punctuation_table
from .results import GenerationConfig, GenerationResult
from .reuse import PrefixStore

log = logging.getLogger(__name__)


class Engine:
    """Runs a causal LM with slimkv's cache and a compressor.

    model, tokenizer: a Hugging Face causal LM and its tokenizer (``slimkv.load_model``)
    compressor: the method applied to every request (None = full cache)
    prefill_chunk: prompt tokens per forward pass while prefilling
    store: reuse stored KV of prompt prefixes and compressed contexts (``engine/reuse.py``)
    """

    def __init__(self, model, tokenizer, compressor: Compressor | None = None, prefill_chunk: int = 4096,
                 store: PrefixStore | None = None) -> None:
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.store = store
        self.adapter = ModelAdapter(model)
        self.tokenizer = tokenizer
        self.compressor = compressor
        self.prefill_chunk = prefill_chunk
        self.end_ids = end_token_ids(tokenizer, model)
        self._punct_table: torch.Tensor | None = None  # see punctuation
        if compressor is not None:
            compressor.bind(self)

    def use_store(self, stack, tenant: str = "default", chunk_size: int = 256,
                  shared_namespace: str | None = None) -> PrefixStore:
        """Reuse KV through a :class:`~slimkv.store.TierStack` (keys scoped to ``tenant``)."""
        from ..store import KeySpec

        spec = KeySpec(tenant=tenant, model=self.adapter.fingerprint(), dtype=str(self.adapter.spec.dtype),
                       chunk_size=chunk_size, shared_namespace=shared_namespace)
        self.store = PrefixStore(stack, spec)
        return self.store

    def with_compressor(self, compressor: Compressor | None) -> Engine:
        """The same model and settings with another compressor (cheap: nothing is reloaded)."""
        clone = copy.copy(self)
        clone.compressor = compressor
        if compressor is not None:
            compressor.bind(clone)
        return clone

    # ------------------------------------------------------------------ prefill
    def new_cache(self, batch: int = 1) -> SlimCache:
        return SlimCache(self.adapter.spec, batch)

    def prefill(self, cache: SlimCache, ids: list[int], progress: ProgressFn | None = None,
                done: int = 0, total: int | None = None,
                observers: tuple[Compressor, ...] | None = None) -> torch.Tensor:
        """Feed ``ids`` to a one-sequence cache in chunks (no compression: see :meth:`compress`).

        observers: methods recording what they need while prefilling (default: the engine's
                   compressor); pass several to let one prefill serve several methods.
        Returns the logits of the last token, [1, vocab].
        """
        if cache.batch != 1:
            raise ValueError("prefill works on one sequence at a time")
        total = total if total is not None else len(ids)
        device = self.adapter.device
        for layer in cache.layers:
            layer.reserve(layer.max_length + len(ids))
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            first = cache.seen[0]
            positions = torch.arange(first, first + len(chunk), device=device)[None]
            punct = self.punctuation(chunk, observers)
            ctx = ForwardContext(cache, positions, self.compressor, phase="prefill", observers=observers,
                                 punctuation=punct)
            logits = self.adapter.forward(torch.tensor([chunk], device=device), positions, ctx)
            cache.seen[0] += len(chunk)
            if progress is not None:
                progress(done + start + len(chunk), total)
        assert logits is not None
        return logits[:, -1]

    def punctuation(self, ids: list[int] | torch.Tensor, observers=None) -> torch.Tensor | None:
        """Punctuation flags of ``ids`` when an observer needs them (FastGen), else None.

        ids: one sequence's tokens (a list -> [1, tokens]) or a [batch, tokens] tensor (-> the same shape)
        """
        watching = observers if observers is not None else (self.compressor,)
        if not any(getattr(o, "needs_punctuation", False) for o in watching if o is not None):
            return None
        if self._punct_table is None:  # one pass over the vocabulary per engine (shared by its clones)
            vocab = self.adapter.model.get_input_embeddings().num_embeddings
            self._punct_table = punctuation_table(self.tokenizer, vocab)
        table = self._punct_table
        ids = torch.as_tensor(ids).cpu()
        ids = ids[None] if ids.dim() == 1 else ids
        return table[ids.clamp(max=table.numel() - 1)].to(self.adapter.device)

    def prepare(self, segments: Segments, progress: ProgressFn | None = None) -> tuple[SlimCache, torch.Tensor]:
        """Prefill and compress one request's prompt; returns its cache and last-token logits.

        With a store (``self.store``), stored KV replaces recomputation where it can (see
        ``engine/reuse.py``); ``self.store.stats`` then tells what was reused.
        """
        self.check_length(segments)
        comp = self.compressor
        compress = comp is not None and (comp.active("prefill") or comp.active("decode"))
        store = self.store
        if store is not None:
            store.begin()
        cache = None
        if store is not None and compress and segments.question:
            assert comp is not None
            cache = store.load_compressed(self.adapter.spec, segments.context, comp)
        logits = None
        if cache is None:
            cache = self.new_cache()
            whole = bool(segments.question)
            start = store.load_prefix(cache, segments.context, whole) if store is not None else 0
            t0 = time.perf_counter()
            if start < len(segments.context):
                logits = self.prefill(cache, segments.context[start:], progress=progress, done=start,
                                      total=segments.total)
            if store is not None:
                miss = len(segments.context) - start
                store.stats.miss_tokens += miss
                if miss:
                    store.stats.saved_s = (time.perf_counter() - t0) / miss * store.stats.hit_tokens
                store.save_prefix(cache, segments.context, start, whole)
            if compress:
                self.compress(cache, "prefill")
                if store is not None and segments.question:
                    assert comp is not None
                    store.save_compressed(cache, segments.context, comp)
        if segments.question:
            logits = self.prefill(cache, segments.question, progress=progress,
                                  done=len(segments.context), total=segments.total)
            if store is not None:
                store.stats.miss_tokens += len(segments.question)
            if comp is not None and comp.active("decode"):
                self.compress(cache, "decode")
        assert logits is not None
        return cache, logits

    def compress(self, cache: SlimCache, phase: str) -> None:
        """Shrink every layer of ``cache`` to the compressor's target for the tokens seen so far."""
        ForwardContext(cache, torch.empty(1, 0), self.compressor, phase=phase).compress()

    def check_length(self, segments: Segments) -> None:
        limit = self.adapter.max_positions
        if segments.total == 0:
            raise InputError("the prompt is empty; give some text to generate from")
        if segments.total >= limit:
            raise InputError(
                f"the prompt has {segments.total} tokens but the model's context is {limit} tokens; "
                "shorten the prompt (or the context file) so that it fits with room for the answer"
            )

    # ------------------------------------------------------------------ generation
    def stream(self, requests: list[Request | Segments] | Request | Segments,
               config: GenerationConfig | None = None, progress: ProgressFn | None = None) -> Generation:
        """Start generating; iterate the result for :class:`TextDelta` pieces, then read ``.results``.

        A request is text (:class:`Request`) or already tokenized (:class:`Segments`).
        """
        reqs = [requests] if isinstance(requests, (Request, Segments)) else list(requests)
        if not reqs:
            raise InputError("no request to generate for")
        config = config or GenerationConfig()
        if config.lossless is not None:
            from ..speculative.loop import LosslessGeneration

            return LosslessGeneration(self, reqs, config, progress)
        return Generation(self, reqs, config, progress)

    def continue_from(self, cache: SlimCache, logits: torch.Tensor, segments: Segments,
                      config: GenerationConfig | None = None) -> GenerationResult:
        """Decode from an already prefilled (and compressed) one-sequence cache.

        logits: [1, vocab] of the prompt's last token; segments: the prompt it holds (for counts).
        With ``config.lossless``, ``cache`` must be the *uncompressed* prefill (observed by the
        compressor): it becomes the full view, and a compressed copy the draft view.
        """
        config = config or GenerationConfig()
        if config.lossless is not None:
            from ..speculative.loop import LosslessGeneration

            gen: Generation = LosslessGeneration(self, [segments], config, None, prepared=[(cache, logits)])
        else:
            gen = Generation(self, [segments], config, None, prepared=[(cache, logits)])
        for _ in gen:
            pass
        return gen.results[0]

    def generate(self, request: Request | Segments | str, config: GenerationConfig | None = None,
                 progress: ProgressFn | None = None) -> GenerationResult:
        """Generate for one request (a plain string is a raw prompt)."""
        req = Request(context=request) if isinstance(request, str) else request
        gen = self.stream(req, config, progress)
        for _ in gen:
            pass
        return gen.results[0]

    def generate_batch(self, requests: list[Request | Segments], config: GenerationConfig | None = None) -> list[GenerationResult]:
        """Generate for several requests decoded together in one batch."""
        gen = self.stream(requests, config)
        for _ in gen:
            pass
        return gen.results
