"""Aggregation tasks (RULER's ``cwe`` and ``fwe``): count words over the whole context.

Their context is generated, not a haystack: a numbered word list (common words extraction) or a text of
random coded words with Zipf-distributed counts (frequent words extraction). Both fit a length by the
number of words: rare words for ``cwe``, the Zipf total for ``fwe``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from . import words
from .base import Draft, Setup, Task, Templates, frame


@dataclass(frozen=True)
class CommonWords(Task):
    """``common`` words repeated often among rare words; answer: the common words.

    Repeats follow RULER: 6 and 1 below 4,096 tokens, 30 and 3 from there on. No rare word contains a
    common one or is contained in one (string match could not tell them apart).
    """

    common: int = 10
    preamble: str = ("Below is a numbered list of words. In these words, some appear more often than others. "
                     "Memorize the ones that appear most often.\n")

    def draft(self, rng: random.Random, depth: float | None, setup: Setup) -> Draft:
        t = setup.templates
        often, rarely = (6, 1) if setup.length < 4096 else (30, 3)
        vocab = words.word_lists().all
        pool = rng.sample(vocab, min(len(vocab), self.common + setup.length // (2 * rarely) + 100))
        common = pool[:self.common]
        rare = [w for w in pool[self.common:] if not any(w in c or c in w for c in common)]
        order, preamble = rng.getrandbits(64), self.preamble

        def context(x: int) -> str:
            items = common * often + rare[:x] * rarely
            random.Random(order).shuffle(items)
            return preamble + " ".join(f"{i}. {w}" for i, w in enumerate(items, 1))

        question = frame(t.question.format(count=self.common), t.answer_prefix.format(count=self.common))
        return Draft(context, question, tuple(common), 0, len(rare))


@functools.cache
def _zeta(alpha: float, terms: int = 100_000) -> float:
    return sum(k ** -alpha for k in range(terms, 0, -1)) + terms ** (1 - alpha) / (alpha - 1)


@dataclass(frozen=True)
class FrequentWords(Task):
    """Coded words with Zipf counts ``int(x * k**-alpha / zeta(alpha))`` for rank ``k``; rank 1 is the
    noise word ``...``; answer: the ``top`` coded words of ranks 2 to ``top + 1``."""

    top: int = 3
    alpha: float = 2.0
    preamble: str = ("Read the following coded text and track the frequency of each coded word. Find the "
                     "three most frequently appeared coded words. ")

    def draft(self, rng: random.Random, depth: float | None, setup: Setup) -> Draft:
        t = setup.templates
        zeta, hi = _zeta(self.alpha), 2 * setup.length
        ranks = int((hi / zeta) ** (1 / self.alpha)) + 2  # the rarest rank that can still appear once
        vocab = ["...", *words.coded_words(rng, max(ranks, self.top + 2))]
        order, preamble = rng.getrandbits(64), self.preamble

        def context(x: int) -> str:
            items = [w for k, w in enumerate(vocab, 1) for _ in range(int(x * k ** -self.alpha / zeta))]
            random.Random(order).shuffle(items)
            return preamble + " ".join(items)

        question = frame(t.question.format(count=self.top), t.answer_prefix.format(count=self.top))
        # from 100 words on, ranks 2..4 are each strictly more frequent than the next rank
        return Draft(context, question, tuple(vocab[1:self.top + 1]), 100, hi)


AGGREGATION = (
    CommonWords("cwe", "common words extraction: the 10 most common words of a numbered list (RULER cwe)",
                Templates(None, "What are the {count} most common words in the above list?",
                          "The top {count} words that appear most often in the list are:"),
                question_fields=(("count", False),), uses_haystack=False),
    FrequentWords("fwe", "frequent words extraction: the 3 most frequent coded words of a Zipf text "
                         "(RULER fwe)",
                  Templates(None, "Do not provide any explanation. Please ignore the dots '...'. What are "
                                  "the three most frequently appeared words in the above coded text?",
                            "According to the coded text above, the three most frequently appeared words "
                            "are:"),
                  question_fields=(("count", False),), uses_haystack=False),
)
