"""Which drafted tokens the full cache accepts, and the verifier's own next token.

Vocabulary (as vLLM's rejection sampler): a verify pass scores the pending token and ``k`` draft
tokens; the *accepted* tokens are the longest prefix of the draft the verifier agrees with; then the
verifier adds one token of its own: the *recovered* token where a draft token was rejected, or the
*bonus* token when all ``k`` were accepted. So every pass emits between 1 and ``k + 1`` tokens.

Greedy: a draft token is accepted when it is the argmax of the verifier's logits at its place; the
emitted tokens are therefore exactly those of full-cache greedy decoding.

Sampling: speculative sampling (Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding", ICML 2023; Chen et al., "Accelerating Large Language Model Decoding with Speculative
Sampling", arXiv:2302.01318): draft token ``d`` drawn from ``q`` is accepted with probability
``min(1, p(d) / q(d))``; on rejection the recovered token is drawn from ``norm(max(0, p - q))``.
Every emitted token is then distributed exactly as under full-cache sampling ``p`` (after the same
temperature, top-k and top-p). Lookup drafts are deterministic: ``q`` is one-hot at the draft token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..engine.sampling import Sampler


@dataclass(frozen=True)
class Verdict:
    """Outcome of one verify pass.

    accepted: how many draft tokens were accepted (a prefix of the draft)
    next_token: the verifier's own token after them (recovered or bonus)
    path: for a token tree, the draft indices of the accepted tokens (``speculative/tree.py``); None for a chain
    """

    accepted: int
    next_token: int
    path: tuple[int, ...] | None = None


def accept_greedy(logits: Tensor, draft: list[int]) -> Verdict:
    """logits: [k + 1, vocab] of the pending token and the ``k`` draft tokens."""
    targets = logits.argmax(dim=-1).tolist()  # targets[i]: the verifier's token after draft[:i]
    accepted = 0
    while accepted < len(draft) and draft[accepted] == targets[accepted]:
        accepted += 1
    return Verdict(accepted, int(targets[accepted]))


def accept_sampled(logits: Tensor, draft: list[int], draft_probs: Tensor | None, sampler: Sampler) -> Verdict:
    """Speculative sampling over one verify pass.

    logits:      [k + 1, vocab] verifier logits
    draft_probs: [k, vocab] the distribution each draft token was drawn from, or None when the draft
                 is deterministic (a lookup)
    """
    p = sampler.probabilities(logits).cpu()  # [k + 1, vocab] float32
    q = draft_probs.float().cpu() if draft_probs is not None else None
    for i, token in enumerate(draft):
        q_row = q[i] if q is not None else _one_hot(token, p.shape[-1])
        if accepts(p[i], q_row, token, sampler.generator):
            continue
        return Verdict(i, recovered(p[i], q_row, sampler.generator))
    return Verdict(len(draft), _draw(p[len(draft)], sampler.generator))


def accepts(p: Tensor, q: Tensor, token: int, generator: torch.Generator) -> bool:
    """Whether ``token`` (drawn from ``q``) is accepted against ``p``: probability min(1, p/q).

    p, q: [vocab] probabilities.
    """
    u = torch.rand((), generator=generator)
    return float(u) * float(q[token]) < float(p[token])


def recovered(p: Tensor, q: Tensor, generator: torch.Generator) -> int:
    """A draw from ``norm(max(0, p - q))``, the correction after a rejection ([vocab] each)."""
    residual = (p - q).clamp(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: a rejection had probability ~0
        residual = p
    return _draw(residual, generator)


def _draw(weights: Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))


def _one_hot(token: int, vocab: int) -> Tensor:
    out = torch.zeros(vocab)
    out[token] = 1.0
    return out
