"""Lossless decoding as a decode strategy of one sequence: draft, verify against the full view, commit.

The scheduler calls :meth:`LosslessDecoder.step` once per engine step for a lossless sequence (plain
sequences decode one token per step in the shared batch). One round::

    dual.begin()                                   # mark both views
    draft = drafter.propose(...)                   # k tokens (self-drafting appends to the draft view)
    logits = dual.verify(pending + draft)          # one pass over the full view: [k + 1, vocab]
    verdict = accept_greedy / accept_sampled       # a accepted + the verifier's own token
    dual.commit(1 + a)                             # exact KV of pending + accepted into both views
                                                   # (a token tree keeps its accepted path, speculative/tree.py)
    emit draft[:a] + [verdict.next_token]          # the last one becomes the pending token

Only verified tokens are ever emitted. If the full view fails, the decoder rebuilds a full cache
from the token ids (one prefill), hands it to the sequence and lets it finish with plain full-cache
decoding, logging a warning.
"""

from __future__ import annotations

import logging

from torch import Tensor

from ..cache import SlimCache
from ..compressors import Compressor
from ..engine.results import LosslessConfig, SpecStats
from ..engine.runner import ModelRunner
from ..engine.sampling import Sampler
from .drafters import Draft, DraftRequest, make_drafter
from .dual import DualCache, FullViewUnavailable, make_full_view
from .tree import accept_tree_greedy, accept_tree_sampled
from .verify import Verdict, accept_greedy, accept_sampled

log = logging.getLogger(__name__)


class Fallback(Exception):
    """The full view failed: decode on with ``cache`` (a full cache of every id so far) and ``logits``."""

    def __init__(self, cache: SlimCache, logits: Tensor) -> None:
        super().__init__("full view unreadable")
        self.cache, self.logits = cache, logits


class LosslessDecoder:
    """The two views of one sequence and its drafter (see the module docstring).

    runner: the model; config: the lossless settings; compressor: the method shrinking the draft view
    full: an uncompressed cache of the whole prompt; draft: the compressed cache of its context
    prompt: the prompt's ids; question: tokens at its end that ``draft`` does not hold yet
    room: tokens both views will still grow by (the answer's budget and one draft)
    """

    def __init__(self, runner: ModelRunner, config: LosslessConfig, compressor: Compressor | None,
                 full: SlimCache, draft: SlimCache, prompt: list[int], question: int, room: int) -> None:
        self.runner = runner
        self.config = config
        self.drafter = make_drafter(config.drafter, config.draft_tokens, config.max_draft_tokens, runner.tokenizer,
                                    config.tree_nodes)
        self.view = make_full_view(config.full_view)
        self.dual = DualCache(draft, self.view, compressor, runner)
        self.dual.open(full, question, room + config.max_draft_tokens + 1)
        self.history = list(prompt)
        self.pending: int | None = None  # the last emitted token (its KV is not cached yet)
        self.counts: dict[str, list[int]] = {}
        self.drafted = self.accepted = self.passes = 0
        self.fallback = False

    @property
    def draft(self) -> SlimCache:
        return self.dual.draft

    def nbytes(self) -> int:
        """Bytes both views hold in memory."""
        return self.dual.nbytes()

    def growth_bytes(self) -> int:
        """Bytes a round may add at most: both views were given room for the whole answer up front."""
        return 0

    def step(self, logits: Tensor | None, sampler: Sampler, remaining: int) -> list[int]:
        """The verified tokens of one round (the first call samples the prompt's ``logits`` [1, vocab]).

        remaining: tokens the sequence may still emit (at least 1)
        Raises :class:`Fallback` when the full view cannot be read.
        """
        if self.pending is None:
            assert logits is not None
            out = [int(sampler(logits)[0])]
        else:
            self.dual.begin()
            req = DraftRequest(self.history, min(self.config.max_draft_tokens, remaining - 1), self.dual, sampler)
            draft = self.drafter.propose(req) if req.limit > 0 else Draft([], "none")
            try:
                scores = self.dual.verify([self.pending, *draft.tokens], draft.parents)
            except FullViewUnavailable as exc:
                log.warning("full view unreadable (%s); continuing with plain full-cache decoding "
                            "(every token so far was verified)", exc)
                raise self._fall_back() from exc
            verdict = _verdict(scores, draft, sampler)
            path = list(range(verdict.accepted)) if verdict.path is None else list(verdict.path)
            self.dual.commit(1 + verdict.accepted, None if verdict.path is None else [0, *(i + 1 for i in path)])
            self.drafter.feedback(draft, verdict.accepted)
            self.passes += 1
            self.drafted += len(draft.tokens)
            self.accepted += verdict.accepted
            c = self.counts.setdefault(draft.source, [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + len(draft.tokens), c[2] + verdict.accepted
            out = [*(draft.tokens[i] for i in path), verdict.next_token]
        return out

    def emitted(self, token: int) -> None:
        """The sequence emitted ``token`` (it becomes the pending token)."""
        self.history.append(token)
        self.pending = token

    def _fall_back(self) -> Fallback:
        """A full cache rebuilt from every id so far, ready to continue after the pending token."""
        self.fallback = True
        cache = self.runner.new_cache()
        logits = self.runner.prefill(cache, self.history)
        return Fallback(cache, logits)

    def stats(self, draft_bytes: int) -> SpecStats:
        full = 0 if self.fallback else self.view.nbytes()
        return SpecStats(
            drafted=self.drafted, accepted=self.accepted, verify_passes=self.passes,
            by_drafter={k: (v[0], v[1], v[2]) for k, v in self.counts.items()},
            draft_view_bytes=draft_bytes, full_view_bytes=full,
            full_view_location=self.view.location, fallback=self.fallback,
        )

    def close(self) -> None:
        self.view.close()


def _verdict(logits: Tensor, draft: Draft, sampler: Sampler) -> Verdict:
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
