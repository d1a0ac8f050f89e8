"""Token trees: several candidate continuations verified together in one pass.

REST (He et al., "REST: Retrieval-Based Speculative Decoding", arXiv:2311.08252) drafts the
continuations of a matched suffix as a trie and verifies all its branches at once. A tree of ``n``
draft tokens is given by ``parents``: ``parents[i]`` is the index of token ``i``'s parent among the
draft tokens, or ``-1`` when its parent is the pending token (the tree's root); a parent always
comes before its children. A chain ``[-1, 0, 1, ...]`` is an ordinary draft.

The verify pass feeds ``[pending, *tokens]`` at positions ``seen + depth`` and lets each token see
the cache, its ancestors and itself (:func:`visibility`); row ``j`` of the pass's logits is then
exactly the verifier's distribution after the path from the root to node ``j`` (row 0: the root).

Acceptance walks down from the root:

- greedy: follow the child whose token is the verifier's argmax; stop where none is. The emitted
  tokens are exactly those of full-cache greedy decoding.
- sampling, for deterministic drafts (lookups): try the children in order; child ``c`` is accepted
  with probability ``r(c)`` under the current residual ``r`` (at first the verifier's ``p``); after a
  rejection ``r`` loses ``c``'s mass and is renormalised; when every child is rejected the emitted
  token is drawn from ``r``. Each emitted token is distributed exactly as ``p`` (the one-hot case of
  SpecInfer's multi-candidate speculative sampling, Miao et al., arXiv:2305.09781).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.sampling import Sampler
from .verify import Verdict


def check_parents(parents: Sequence[int]) -> None:
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"token {i} of a draft tree has parent {p}; parents must come first (or be -1)")


def is_chain(parents: Sequence[int] | None) -> bool:
    return parents is None or list(parents) == list(range(-1, len(parents) - 1))


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of every draft token below the pending token (children of the root: 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def visibility(parents: Sequence[int]) -> Tensor:
    """``[n + 1, n + 1]`` bool: which tokens of ``[pending, *draft]`` each one attends to."""
    n = len(parents)
    seen = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    seen[0, 0] = True
    for i, p in enumerate(parents):
        row = i + 1
        seen[row] = seen[p + 1]  # the parent's ancestors (the root's row for p = -1)
        seen[row, row] = True
    return seen


def _children(parents: Sequence[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    return kids


def accept_tree_greedy(logits: Tensor, tokens: Sequence[int], parents: Sequence[int]) -> Verdict:
    """logits: [n + 1, vocab] of ``[pending, *tokens]``; the path is a list of draft indices."""
    targets = logits.argmax(dim=-1).tolist()
    kids = _children(parents)
    node, path = -1, []
    while True:
        want = targets[node + 1]
        nxt = next((c for c in kids.get(node, []) if tokens[c] == want), None)
        if nxt is None:
            return Verdict(len(path), int(want), tuple(path))
        path.append(nxt)
        node = nxt


def accept_tree_sampled(logits: Tensor, tokens: Sequence[int], parents: Sequence[int], sampler: Sampler) -> Verdict:
    """Multi-candidate speculative sampling over a deterministic token tree (module docstring)."""
    p_all = sampler.probabilities(logits).cpu()  # [n + 1, vocab]
    kids = _children(parents)
    gen = sampler.generator
    node, path = -1, []
    while True:
        residual = p_all[node + 1].clone()
        nxt = None
        for c in kids.get(node, []):
            total = float(residual.sum())
            if total <= 0.0:
                break
            if float(torch.rand((), generator=gen)) * total < float(residual[tokens[c]]):
                nxt = c
                break
            residual[tokens[c]] = 0.0
        if nxt is None:
            if float(residual.sum()) <= 0.0:  # children held all the mass but were rejected: ~0 probability
                residual = p_all[node + 1]
            token = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
            return Verdict(len(path), token, tuple(path))
        path.append(nxt)
        node = nxt


def build_tree(continuations: Sequence[Sequence[int]], max_nodes: int) -> tuple[list[int], list[int]]:
    """The ``max_nodes`` most supported nodes of the continuations' trie -> (tokens, parents).

    A node's support is how many continuations pass through it, so a node never outranks its parent
    and the chosen nodes form a tree; ties go to the shallower node, then to the earlier one. Nodes
    come out in breadth-first order (parents first), children by support.
    """
    trie: dict[tuple[int, ...], int] = {}
    for cont in continuations:
        for d in range(1, len(cont) + 1):
            key = tuple(cont[:d])
            trie[key] = trie.get(key, 0) + 1
    order = sorted(trie, key=lambda k: (-trie[k], len(k)))  # stable: first seen first among equals
    chosen = sorted(order[:max_nodes], key=lambda k: (len(k), -trie[k]))
    index = {k: i for i, k in enumerate(chosen)}
    tokens = [k[-1] for k in chosen]
    parents = [index[k[:-1]] if len(k) > 1 else -1 for k in chosen]
    return tokens, parents
