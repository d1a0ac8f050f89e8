"""A single needle prompt (RULER niah_single style) on the repeated noise haystack.

A thin shim over :mod:`slimkv.evals.tasks` (the ``needle`` task) kept for the demo and the benchmarks;
use :func:`slimkv.evals.tasks.make_samples` for anything new. The prompt shape follows EVAL.md: raw
text, the needle at a chosen depth, and a question whose answer prefix makes the model complete it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .haystacks import NOISE  # noqa: F401  (re-exported: the haystack this module always used)
from .tasks import make_sample


@dataclass(frozen=True)
class NeedleSample:
    """One needle task: ``context`` (haystack with needle), ``question`` and the expected ``answer``."""

    context: str
    question: str
    answer: str
    depth: float


def needle_sample(tokenizer, tokens: int, depth: float, seed: int = 0) -> NeedleSample:
    """A needle prompt of at most ``tokens`` tokens (within ~0.5%) with the needle at ``depth``
    (0 = start, 1 = end), e.g. ``"... The special magic number is 73691. ...\\n\\nQuestion: What is the
    special magic number? Answer: The special magic number is"`` answered by ``"73691"``."""
    s = make_sample("needle", tokenizer, tokens, depth=depth, seed=seed)
    return NeedleSample(context=s.context, question=s.question, answer=s.answers[0], depth=depth)
