"""The lossless decode loop: draft, verify against the full view, commit, emit.

One round (``LosslessGeneration.__iter__``)::

    dual.begin()                                   # mark both views
    draft = drafter.propose(...)                   # k tokens (self-drafting appends to the draft view)
    logits = dual.verify(pending + draft)          # one pass over the full view: [k + 1, vocab]
    verdict = accept_greedy / accept_sampled       # a accepted + the verifier's own token
    dual.commit(1 + a)                             # exact KV of pending + accepted into both views
                                                   # (a token tree keeps its accepted path, spec/tree.py)
    emit draft[:a] + [verdict.next_token]          # the last one becomes the pending token

Only verified tokens are ever emitted. If the full view fails, the loop rebuilds a full cache from the
token ids (one prefill) and finishes with plain full-cache decoding, logging a warning.
One sequence at a time (no batching).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from ..engine.forward import ForwardContext
from ..engine.loop import Generation
from ..engine.results import GenerationResult, SpecStats, Timing
from ..engine.sampling import Sampler
from ..errors import ConfigError
from .drafters import Draft, DraftRequest, make_drafter
from .dual import FullViewUnavailable, make_full_view, prepare_dual
from .tree import accept_tree_greedy, accept_tree_sampled
from .verify import Verdict, accept_greedy, accept_sampled

log = logging.getLogger(__name__)


class LosslessGeneration(Generation):
    """A generation whose tokens are all verified against the full cache (see the module docstring)."""

    def __iter__(self) -> Iterator:
        engine, cfg = self.engine, self.config
        lcfg = cfg.lossless
        assert lcfg is not None
        if len(self.rows) != 1:
            raise ConfigError("lossless decoding runs one sequence at a time; send requests one by one")
        row = self.rows[0]
        sampler = Sampler(cfg.sampling)
        drafter = make_drafter(lcfg.drafter, lcfg.draft_tokens, lcfg.max_draft_tokens, engine.tokenizer,
                               lcfg.tree_nodes)
        full_view = make_full_view(lcfg.full_view)
        counts: dict[str, list[int]] = {}
        drafted = accepted = passes = 0
        fallback = False
        limit = engine.adapter.max_positions
        budget = min(cfg.max_new_tokens, limit - row.segments.total)
        try:
            with engine.adapter.attached():
                t0 = time.perf_counter()
                dual, logits = prepare_dual(engine, row.segments, full_view,
                                            room=budget + lcfg.max_draft_tokens + 1, progress=self.progress,
                                            prefilled=row.prepared)
                after_prefill = dual.draft.stats()
                prefill_s = time.perf_counter() - t0
                history = list(row.segments.context) + list(row.segments.question)
                ttft = t_first = None
                pending = None
                while row.finish is None:
                    if len(row.ids) >= budget:
                        row.finish = "length"
                        break
                    if pending is None:  # the first token comes from the prefill's logits
                        out = [int(sampler(logits)[0])]
                    else:
                        remaining = budget - len(row.ids)
                        dual.begin()
                        req = DraftRequest(history, min(lcfg.max_draft_tokens, remaining - 1), dual,
                                           engine.adapter, sampler)
                        draft = drafter.propose(req) if req.limit > 0 else Draft([], "none")
                        try:
                            scores = dual.verify(engine.adapter, [pending, *draft.tokens], draft.parents)
                        except FullViewUnavailable as exc:
                            log.warning("full view unreadable (%s); continuing with plain full-cache "
                                        "decoding (every token so far was verified)", exc)
                            fallback = True
                            yield from self._plain(row, history, sampler, budget)
                            break
                        verdict = _verdict(scores, draft, sampler)
                        path = list(range(verdict.accepted)) if verdict.path is None else list(verdict.path)
                        dual.commit(1 + verdict.accepted, None if verdict.path is None else [0, *(i + 1 for i in path)])
                        drafter.feedback(draft, verdict.accepted)
                        passes += 1
                        drafted += len(draft.tokens)
                        accepted += verdict.accepted
                        c = counts.setdefault(draft.source, [0, 0, 0])
                        c[0], c[1], c[2] = c[0] + 1, c[1] + len(draft.tokens), c[2] + verdict.accepted
                        out = [*(draft.tokens[i] for i in path), verdict.next_token]
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                        t_first = time.perf_counter()
                    for token in out:
                        yield from self._accept(0, row, token)
                        history.append(token)
                        if row.finish is not None:
                            break
                    pending = out[-1]
                decode_s = time.perf_counter() - t_first if t_first is not None else 0.0
                final = self._fallback_cache.stats() if fallback else dual.draft.stats()
                full_bytes = 0 if fallback else full_view.nbytes()
        finally:
            full_view.close()
        yield from self._flush(0, row)
        generated = len(row.ids)
        spec = SpecStats(
            drafted=drafted, accepted=accepted, verify_passes=passes,
            by_drafter={k: (v[0], v[1], v[2]) for k, v in counts.items()},
            draft_view_bytes=final.bytes_kept, full_view_bytes=full_bytes,
            full_view_location=full_view.location, fallback=fallback,
        )
        self.results.append(GenerationResult(
            text=row.text, token_ids=row.ids, prompt_tokens=row.segments.total,
            finish_reason=row.finish or "length", cache_after_prefill=after_prefill, cache=final,
            timing=Timing(prefill_s=prefill_s, ttft_s=ttft if ttft is not None else prefill_s,
                          decode_tokens_per_s=(generated - 1) / decode_s if decode_s > 0 and generated > 1
                          else 0.0),
            spec=spec,
        ))

    def _plain(self, row, history: list[int], sampler: Sampler, budget: int) -> Iterator:
        """Fallback: rebuild a full cache from the ids (all but the pending token) and decode plainly."""
        engine = self.engine.with_compressor(None)
        cache = engine.new_cache()
        engine.prefill(cache, history[:-1])
        self._fallback_cache = cache
        token = history[-1]
        device = engine.adapter.device
        while row.finish is None and len(row.ids) < budget:
            positions = torch.tensor([[cache.seen[0]]], device=device)  # [1, 1]
            ctx = ForwardContext(cache, positions, None, phase="decode")
            logits = engine.adapter.forward(torch.tensor([[token]], device=device), positions, ctx)[:, -1]
            cache.seen[0] += 1
            token = int(sampler(logits)[0])
            yield from self._accept(0, row, token)
            history.append(token)
        if row.finish is None:
            row.finish = "length"


def _verdict(logits: torch.Tensor, draft: Draft, sampler: Sampler) -> Verdict:
    """The verdict on one verify pass: a chain or a token tree, greedy or sampled."""
    if draft.parents is not None:
        if draft.probs is not None:
            raise ValueError("token trees come from lookups; a sampled draft must be a chain")
        if sampler.config.greedy:
            return accept_tree_greedy(logits, draft.tokens, draft.parents)
        return accept_tree_sampled(logits, draft.tokens, draft.parents, sampler)
    if sampler.config.greedy:
        return accept_greedy(logits, draft.tokens)
    return accept_sampled(logits, draft.tokens, draft.probs, sampler)
