"""Seeded long-context tasks sized in tokens of the model's tokenizer (RULER-style, raw prompts).

:data:`TASKS` maps each name to its generator: ``needle``, ``multikey``, ``multivalue``, ``multiquery``,
``passkey`` (retrieval), ``vt`` (variable tracking), ``cwe`` and ``fwe`` (aggregation).
:func:`make_samples` returns ``n`` samples whose ``context + question`` is at most ``length`` tokens and
within ~0.5% of it, with the asked needle's depth spread evenly over the samples. The same arguments
always give the same samples; another seed gives other ones.

Example::

    samples = make_samples("needle", tokenizer, 2000, n=5, seed=0, haystack="essays")
    prompt, expected = samples[0].context + samples[0].question, samples[0].answers
"""

from __future__ import annotations

import logging
import os
import random

from ...errors import InputError
from .aggregation import AGGREGATION
from .base import Draft, Sample, Setup, Task, Templates
from .filler import Tokenizer, fit, make_filler
from .retrieval import RETRIEVAL
from .tracking import TRACKING

log = logging.getLogger(__name__)

__all__ = ["MIN_LENGTH", "TASKS", "Sample", "Task", "Templates", "make_sample", "make_samples"]

TASKS: dict[str, Task] = {t.name: t for t in (*RETRIEVAL, *TRACKING, *AGGREGATION)}
MIN_LENGTH = 256  # tokens; shorter prompts leave too little haystack to test anything
SHORTFALL = 0.05  # a sample may fall at most this fraction short of the requested length


def make_samples(task: str, tokenizer: Tokenizer, length: int, n: int, seed: int = 0,
                 haystack: str | os.PathLike = "noise", needle: str | None = None,
                 question: str | None = None, answer_prefix: str | None = None) -> list[Sample]:
    """``n`` samples of ``task``, each ``len(tokenizer.encode(context + question))`` <= ``length`` tokens.

    haystack: ``noise``, ``bible``, ``essays``, ``shakespeare`` or a UTF-8 text file (see
        :mod:`slimkv.evals.haystacks`); ignored by ``cwe`` and ``fwe``, which generate their context.
    needle, question, answer_prefix: templates replacing the task's defaults (``TASKS[task].defaults``);
        the needle holds ``{value}`` (and ``{key}`` for keyed tasks), the question and answer prefix the
        placeholders of ``TASKS[task].question_fields``. The prompt ends ``"\\n\\nQuestion: {question}
        Answer: {answer_prefix}"``.
    Depths (positional tasks): ``(i + 0.5) / n`` for sample ``i``, so 0.1, 0.3, ..., 0.9 for ``n = 5``.

    Every check runs before any sample is made: :class:`InputError` for an unknown task, a bad template, a
    length below :data:`MIN_LENGTH` or too short for the task's fixed text, an unknown or missing haystack,
    or real text shorter than ``length``.
    """
    spec, setup = _prepare(task, tokenizer, length, n, haystack, needle, question, answer_prefix)
    depths = [(i + 0.5) / n if spec.positional else None for i in range(n)]
    samples: list[Sample] = []
    guess = None  # the previous sample's filler amount: samples differ little, so it nearly fits
    for i, depth in enumerate(depths):
        sample, guess = _generate(spec, setup, tokenizer, depth, seed, i, guess)
        samples.append(sample)
    log.info("%d %s samples of %d tokens (seed %d, haystack %s)", n, spec.name, length, seed,
             os.fspath(haystack) if spec.uses_haystack else "none")
    return samples


def make_sample(task: str, tokenizer: Tokenizer, length: int, depth: float | None = None, seed: int = 0,
                index: int = 0, haystack: str | os.PathLike = "noise", needle: str | None = None,
                question: str | None = None, answer_prefix: str | None = None) -> Sample:
    """One sample with the asked needle at ``depth`` (positional tasks; default 0.5), else as
    :func:`make_samples`. ``(task, length, seed, index)`` fix the random content."""
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must be in [0, 1] (0 = start of the haystack, 1 = end), got {depth}")
    spec, setup = _prepare(task, tokenizer, length, 1, haystack, needle, question, answer_prefix)
    depth = (0.5 if depth is None else depth) if spec.positional else None
    return _generate(spec, setup, tokenizer, depth, seed, index)[0]


def _prepare(task: str, tokenizer: Tokenizer, length: int, n: int, haystack: str | os.PathLike,
             needle: str | None, question: str | None, answer_prefix: str | None) -> tuple[Task, Setup]:
    spec = TASKS.get(task)
    if spec is None:
        raise InputError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the number of samples must be a whole number >= 1, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise InputError(f"length must be a whole number of tokens >= {MIN_LENGTH}, got {length!r}; "
                         f"ask for a longer prompt")
    templates = spec.templates_for(needle, question, answer_prefix)
    filler = make_filler(os.fspath(haystack), tokenizer, length) if spec.uses_haystack else None
    return spec, Setup(length, templates, filler)


def _generate(spec: Task, setup: Setup, tokenizer: Tokenizer, depth: float | None, seed: int, index: int,
              guess: int | None = None) -> tuple[Sample, int]:
    """One sample fitted to ``setup.length``, and the filler amount it took."""
    rng = random.Random(f"slimkv/{spec.name}/{seed}/{setup.length}/{index}")  # str seeds hash with SHA-512
    draft: Draft = spec.draft(rng, depth, setup)
    seen: dict[int, tuple[str, int]] = {}

    def count(x: int) -> int:
        context = draft.context(x)
        seen[x] = (context, len(tokenizer.encode(context + draft.question)))
        return seen[x][1]

    units = fit(count, setup.length, draft.lo, draft.hi, guess, what=f"{spec.name} prompt")
    context, tokens = seen[units]
    if tokens < (1 - SHORTFALL) * setup.length:
        raise InputError(f"could fill a {spec.name} prompt to only {tokens} of the {setup.length} tokens "
                         f"requested (its haystack or word list ran out); ask for at most {tokens} tokens")
    log.debug("%s sample %d: %d tokens (%d units of filler), depth %s", spec.name, index, tokens, units,
              depth)
    sample = Sample(spec.name, context, draft.question, draft.answers, setup.length, tokens, depth, seed,
                    index)
    return sample, units
