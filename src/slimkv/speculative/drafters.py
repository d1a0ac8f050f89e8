"""Drafters: where the tokens a verify pass checks come from.

Contract: the lossless decoder (``speculative/lossless.py``) calls :meth:`Drafter.propose` once per round, after
:meth:`DualCache.begin` and before the verify pass, with the text so far (prompt + generated ids,
ending with the pending token whose KV is not cached yet) and the most tokens it may draft. A drafter
returns a :class:`Draft` (possibly empty) and must leave nothing in the caches but appends to the
draft view (the loop's commit rolls those back). Drafters are cheap to compose: :class:`AutoDrafter`
takes a lookup draft when its match is long and self-drafts otherwise.

Drafters here:

* :class:`SelfDrafter` - VeriCache's drafting: decode ``k`` tokens with the compressed draft view.
* :class:`PromptLookupDrafter` - prompt lookup decoding (Saxena, 2023,
  github.com/apoorvumang/prompt-lookup-decoding): the longest recent n-gram of the text that occurred
  earlier in the prompt or the output proposes the tokens that followed it. Free: no forward pass.
* :class:`RestDrafter` - REST (He et al., "REST: Retrieval-Based Speculative Decoding", NAACL 2024,
  arXiv:2311.08252): the longest suffix of the text found in a datastore over a corpus proposes the
  most frequent continuation (``speculative/datastore.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..engine.sampling import Sampler
from .dual import DualCache
from .tree import is_chain


@dataclass(frozen=True)
class Draft:
    """Tokens proposed for one verify pass.

    tokens: the draft, in order; source: the drafter that made it (for statistics)
    probs: [k, vocab] the distribution each token was sampled from (sampled self-drafts); None when
           the draft is deterministic (greedy self-drafts, lookups)
    match: tokens of the text a lookup matched (0 for self-drafts)
    parents: a token tree (``speculative/tree.py``): the parent index of every token, -1 for the pending
             token; None for a chain (each token follows the previous one)
    """

    tokens: list[int]
    source: str
    probs: Tensor | None = None
    match: int = 0
    parents: list[int] | None = None


@dataclass
class DraftRequest:
    """What a drafter may read in one round.

    history: prompt and generated ids so far, ending with the pending token
    limit: most tokens to draft; dual: the two views (and the model, ``dual.runner``); sampler: the
    sequence's sampler
    """

    history: list[int]
    limit: int
    dual: DualCache
    sampler: Sampler


class Drafter:
    """Base class: override :meth:`propose` (see the module docstring for the contract)."""

    name = "drafter"

    def propose(self, req: DraftRequest) -> Draft:
        raise NotImplementedError

    def feedback(self, draft: Draft, accepted: int) -> None:
        """Told, after each verify pass, how many of its draft tokens were accepted."""


@dataclass
class SelfDrafter(Drafter):
    """Decode the draft with the compressed cache (VeriCache); the draft length adapts.

    k: current draft length; grows by one after a fully accepted draft, shrinks by one after a
       rejection, within [1, max_k]
    """

    k: int = 4
    max_k: int = 8
    name = "self"

    def propose(self, req: DraftRequest) -> Draft:
        cache, runner, sampler = req.dual.draft, req.dual.runner, req.sampler
        token, tokens, probs = req.history[-1], [], []
        for _ in range(min(self.k, req.limit)):
            # append only (no compressor): the commit rolls these entries back
            logits = runner.forward([runner.row(cache, [token], None, "decode")])[:, -1]  # [1, V]
            if sampler.config.greedy:
                token = int(logits.argmax(dim=-1))
            else:
                p = sampler.probabilities(logits)[0].cpu()  # [V]
                token = int(torch.multinomial(p, 1, generator=sampler.generator))
                probs.append(p)
            tokens.append(token)
        return Draft(tokens, self.name, torch.stack(probs) if probs else None)

    def feedback(self, draft: Draft, accepted: int) -> None:
        if draft.source != self.name or not draft.tokens:
            return
        if accepted == len(draft.tokens):
            self.k = min(self.k + 1, self.max_k)
        else:
            self.k = max(self.k - 1, 1)


@dataclass
class NgramIndex:
    """Most recent earlier occurrence of every n-gram of a token list (n in [min_n, max_n]).

    Incremental: :meth:`sync` indexes tokens appended since the last call. An n-gram is indexed by the
    position right after it (where its continuation starts) only once that position exists, so the
    text's own final n-gram never matches itself.
    """

    min_n: int = 1
    max_n: int = 4
    _table: dict[tuple[int, ...], int] = field(default_factory=dict)
    _done: int = 0

    def sync(self, history: list[int]) -> None:
        for end in range(max(self._done, 1), len(history)):  # continuation starts at `end`
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._table[tuple(history[end - n : end])] = end
        self._done = max(self._done, len(history))

    def match(self, history: list[int]) -> tuple[int, int]:
        """(match length, continuation start) of the longest suffix found, or (0, -1)."""
        self.sync(history)
        for n in range(min(self.max_n, len(history)), self.min_n - 1, -1):
            start = self._table.get(tuple(history[-n:]))
            if start is not None:
                return n, start
        return 0, -1


@dataclass
class PromptLookupDrafter(Drafter):
    """Prompt lookup decoding: copy what followed the longest matching recent n-gram.

    min_n, max_n: n-gram sizes tried, longest first
    """

    min_n: int = 1
    max_n: int = 4
    name = "prompt"

    def __post_init__(self) -> None:
        self._index = NgramIndex(self.min_n, self.max_n)

    def propose(self, req: DraftRequest) -> Draft:
        n, start = self._index.match(req.history)
        if n == 0:
            return Draft([], self.name)
        return Draft(req.history[start : start + req.limit], self.name, match=n)


@dataclass
class RestDrafter(Drafter):
    """REST: the continuations of the longest suffix found in a datastore, as a token tree.

    store: a loaded :class:`~slimkv.speculative.datastore.Datastore`; max_suffix: longest suffix tried
    min_match: shortest suffix match worth a draft (a 1-token match mostly proposes noise, and a
               rejected draft still costs its verify pass)
    tree_nodes: draft tokens of the tree (its best-supported trie nodes, all verified in one pass);
                0 drafts only the most frequent path
    """

    store: object
    max_suffix: int = 16
    min_match: int = 2
    tree_nodes: int = 16
    name = "rest"

    def propose(self, req: DraftRequest) -> Draft:
        suffix = req.history[-self.max_suffix :]
        if self.tree_nodes > 0:
            match, tokens, parents = self.store.tree(suffix, req.limit, self.tree_nodes, self.min_match)
            return Draft(tokens, self.name, match=match, parents=None if is_chain(parents) else parents)
        match, tokens = self.store.draft(suffix, req.limit, self.min_match)
        return Draft(tokens, self.name, match=match)


@dataclass
class AutoDrafter(Drafter):
    """Take the lookup draft with the longest match when it is at least ``min_match`` tokens, else self-draft.

    lookups: free drafters tried first; fallback: the drafter used when no lookup matches well
    """

    lookups: list[Drafter]
    fallback: Drafter
    min_match: int = 3
    name = "auto"

    def propose(self, req: DraftRequest) -> Draft:
        best = max((d.propose(req) for d in self.lookups), key=lambda d: (d.match, len(d.tokens)),
                   default=None)
        if best is not None and best.tokens and best.match >= self.min_match:
            return best
        return self.fallback.propose(req)

    def feedback(self, draft: Draft, accepted: int) -> None:
        for d in [*self.lookups, self.fallback]:
            d.feedback(draft, accepted)


def make_drafter(spec: str, draft_tokens: int = 4, max_draft_tokens: int = 8, tokenizer=None,
                 tree_nodes: int = 16) -> Drafter:
    """A drafter from ``--drafter``: self, prompt, rest:PATH, auto or auto:PATH.

    tokenizer: when given, a datastore built with another tokenizer is refused.
    tree_nodes: REST's token-tree size (0: one path)
    """
    kind, _, path = spec.partition(":")
    if kind == "self":
        return SelfDrafter(draft_tokens, max_draft_tokens)
    if kind == "prompt":
        return PromptLookupDrafter()
    rest = None
    if path:
        from .datastore import Datastore, tokenizer_fingerprint

        store = Datastore.load(path)
        if tokenizer is not None:
            store.check_tokenizer(tokenizer_fingerprint(tokenizer))
        rest = RestDrafter(store, tree_nodes=tree_nodes)
    if kind == "rest":
        assert rest is not None
        return rest
    lookups: list[Drafter] = [PromptLookupDrafter()] + ([rest] if rest is not None else [])
    return AutoDrafter(lookups, SelfDrafter(draft_tokens, max_draft_tokens))
