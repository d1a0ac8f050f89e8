"""Needle retrieval (RULER's NIAH family and the classic passkey): numbers hidden in a haystack.

One dataclass covers the family through three counts, as RULER's ``num_needle_k/v/q`` do: ``keys``
needles with distinct keys, ``values`` values per key, and ``queries`` keys asked (the rest are
distractors). Values are 5-digit numbers, keys ``adjective-noun`` words; neither occurs in the haystack.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import words
from .base import Draft, Setup, Task, Templates, frame


def join_keys(keys: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


@dataclass(frozen=True)
class Needles(Task):
    """``keys`` x ``values`` needles in the haystack, the first ``queries`` keys asked.

    In a positional task the first value of the first key sits at the sample's depth and the other
    needles at random depths; otherwise all are random. Answers: every value of every asked key.
    """

    keys: int = 1
    values: int = 1
    queries: int = 1
    preamble: str = ""  # text before the haystack (the passkey's instruction)

    def draft(self, rng: random.Random, depth: float | None, setup: Setup) -> Draft:
        filler, t = setup.filler, setup.templates
        avoid = filler.text
        names = words.keys(rng, self.keys, avoid)
        taken: set[str] = set()
        values = [words.numbers(rng, self.values, avoid, taken) for _ in names]
        inserts = []
        for i, key in enumerate(names):
            for j, value in enumerate(values[i]):
                where = depth if depth is not None and i == j == 0 else rng.random()
                inserts.append((where, t.needle.format(key=key, value=value)))
        asked = join_keys(names[:self.queries])
        question = frame(t.question.format(key=asked), t.answer_prefix.format(key=asked))
        answers = tuple(v for vs in values[:self.queries] for v in vs)
        preamble = self.preamble
        return Draft(lambda x: preamble + filler.render(x, inserts), question, answers, 0, len(filler.pieces))


_KEY = (("value", True), ("key", False))
_KEYED = (("value", True), ("key", True))

RETRIEVAL = (
    Needles("needle", "one needle in the haystack (RULER niah_single)",
            Templates("The special magic number is {value}.", "What is the special magic number?",
                      "The special magic number is"),
            needle_fields=_KEY, question_fields=(("key", False),), positional=True),
    Needles("multikey", "four needles with different keys, one asked (RULER niah_multikey)",
            Templates("The special magic number for {key} is {value}.",
                      "What is the special magic number for {key}?", "The special magic number for {key} is"),
            needle_fields=_KEYED, question_fields=(("key", True),), positional=True, keys=4),
    Needles("multivalue", "one key with four values, all asked (RULER niah_multivalue)",
            Templates("One of the special magic numbers for {key} is {value}.",
                      "What are all the special magic numbers for {key}?",
                      "The special magic numbers for {key} are"),
            needle_fields=_KEY, question_fields=(("key", False),), values=4),
    Needles("multiquery", "four keys, all asked at once (RULER niah_multiquery)",
            Templates("The special magic number for {key} is {value}.",
                      "What are the special magic numbers for {key}?",
                      "The special magic numbers for {key} are"),
            needle_fields=_KEYED, question_fields=(("key", True),), keys=4, queries=4),
    Needles("passkey", "the classic pass key in repeated noise (Mohtashami & Jaggi, 2023)",
            Templates("The pass key is {value}. Remember it. {value} is the pass key.",
                      "What is the pass key?", "The pass key is"),
            needle_fields=_KEY, question_fields=(("key", False),), positional=True,
            preamble="There is an important info hidden inside a lot of irrelevant text. Find it and "
                     "memorize them. I will quiz you about the important information there.\n"),
)
