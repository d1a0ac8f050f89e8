"""The task interface: what a sample is, and what a task generator overrides.

Contract: :func:`slimkv.evals.tasks.make_samples` looks the task up, calls :meth:`Task.templates_for`
once (which validates user templates), prepares the haystack filler once, then for every sample calls
:meth:`Task.draft` with a fresh seeded ``random.Random`` and the sample's needle depth. A draft is the
sample's content as a function of the amount of filler; ``make_samples`` fits that amount to the
requested token length and freezes the result into a :class:`Sample`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import InputError
from .filler import Filler


@dataclass(frozen=True)
class Sample:
    """One generated prompt and the strings a correct answer contains.

    ``context + question`` is the raw prompt (no chat template). ``question`` starts with
    ``"\\n\\nQuestion: "`` and ends with the answer prefix, so a model's continuation is the answer, e.g.
    ``"...\\n\\nQuestion: What is the special magic number? Answer: The special magic number is"``.
    ``length`` is the requested length and ``tokens`` the measured ``len(tokenizer.encode(context +
    question))`` (``length - tokens`` is at most ~0.5% of ``length``, never negative). ``depth`` is where
    the asked needle sits (0 = start, 1 = end of the haystack) for positional tasks, else None.
    ``seed`` and ``index`` regenerate the sample.
    """

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    length: int
    tokens: int
    depth: float | None
    seed: int
    index: int


@dataclass(frozen=True)
class Templates:
    """A task's text: the needle (``None``: the task has none), the question and the answer prefix."""

    needle: str | None
    question: str
    answer_prefix: str


@dataclass(frozen=True)
class Setup:
    """What every sample of one ``make_samples`` call shares."""

    length: int  # requested prompt tokens
    templates: Templates  # validated, user overrides applied
    filler: Filler | None  # the haystack cut to length; None for tasks that do not use one


@dataclass(frozen=True)
class Draft:
    """One sample before fitting: ``context(x)`` is its context with ``x`` units of filler, ``lo <= x <= hi``
    (haystack pieces, list words, ...); the token count of ``context(x) + question`` grows with ``x``."""

    context: Callable[[int], str]
    question: str
    answers: tuple[str, ...]
    lo: int
    hi: int


def frame(question: str, answer_prefix: str) -> str:
    """The question block appended to every context: ``"\\n\\nQuestion: {q} Answer: {prefix}"``."""
    return f"\n\nQuestion: {question.strip()} Answer: {answer_prefix.strip()}".rstrip()


def placeholders(template: str, what: str) -> set[str]:
    """The ``{name}`` fields of a ``str.format`` template; :class:`InputError` if it is malformed."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise InputError(f"the {what} template {template!r} is malformed ({e}); write placeholders as "
                         "{value} and literal braces as {{ and }}") from None
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise InputError(f"the {what} template {template!r} has a placeholder {{{bad[0]}}}; "
                         "use named placeholders such as {value}")
    return set(names)


@dataclass(frozen=True)
class Task:
    """A seeded generator of one task's samples. Subclasses override :meth:`draft`.

    ``needle_fields`` / ``question_fields`` map each placeholder the needle / question and answer prefix
    may hold to whether it is required. ``positional`` tasks hide one asked needle at the depth that
    ``make_samples`` spreads over the samples; ``uses_haystack`` is False for tasks whose whole context
    is generated (word lists).
    """

    name: str
    description: str
    defaults: Templates
    needle_fields: tuple[tuple[str, bool], ...] = ()
    question_fields: tuple[tuple[str, bool], ...] = ()
    positional: bool = False
    uses_haystack: bool = True

    def draft(self, rng: random.Random, depth: float | None, setup: Setup) -> Draft:
        """The content of one sample, drawn from ``rng`` only (so a seed fixes it)."""
        raise NotImplementedError

    def templates_for(self, needle: str | None, question: str | None, answer_prefix: str | None) -> Templates:
        """The defaults with the given overrides; :class:`InputError` for a template that misses a required
        placeholder or names one the task does not fill, or for a needle on a task without needles."""
        if needle is not None and self.defaults.needle is None:
            raise InputError(f"task {self.name!r} has no needle to override; leave the needle template out")
        out = Templates(self.defaults.needle if needle is None else needle,
                        self.defaults.question if question is None else question,
                        self.defaults.answer_prefix if answer_prefix is None else answer_prefix)
        checks = [("needle", out.needle, dict(self.needle_fields))] if out.needle is not None else []
        checks += [("question", out.question, dict(self.question_fields)),
                   ("answer prefix", out.answer_prefix, {k: False for k, _ in self.question_fields})]
        for what, template, fields in checks:
            found = placeholders(template, what)
            unknown = sorted(found - set(fields))
            missing = sorted(k for k, required in fields.items() if required and k not in found)
            allowed = ", ".join("{" + k + "}" for k in fields) or "none"
            if unknown or missing:
                problem = f"has {{{unknown[0]}}}" if unknown else f"lacks {{{missing[0]}}}"
                raise InputError(f"the {what} template {template!r} of task {self.name!r} {problem}; "
                                 f"its placeholders: {allowed}"
                                 + (f" ({', '.join('{' + k + '}' for k in fields if fields[k])} required)"
                                    if any(fields.values()) else ""))
        return out
