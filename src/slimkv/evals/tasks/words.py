"""Random content for the tasks: keys, values, variable names, word lists, coded words.

Keys and word lists come from the English word lists that the PyPI package ``wonderwords`` ships
(``wonderwords/assets/*.txt``, read as files, the package is not imported). Without it, a fixed list of
pronounceable pseudo-words generated from a constant seed stands in (logged once): samples are then still
deterministic, but differ from those made with wonderwords installed.

Every draw takes the sample's ``random.Random``; ``avoid`` is the haystack text, so that no drawn value,
key or name already occurs in it (a needle's answer must appear in the context only where it was put).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FALLBACK_SEED = "slimkv-pseudo-words-v1"


@dataclass(frozen=True)
class WordLists:
    """Lower-case alphabetic words, sorted, without duplicates."""

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]
    source: str  # "wonderwords" or "generated"

    @property
    def all(self) -> tuple[str, ...]:
        """Every word once (nouns, adjectives and verbs), sorted: the vocabulary of common-words tasks."""
        return tuple(sorted(set(self.nouns) | set(self.adjectives) | set(self.verbs)))


def _clean(lines: list[str], banned: set[str]) -> tuple[str, ...]:
    words = {w.strip() for w in lines}
    return tuple(sorted(w for w in words if len(w) >= 3 and w.isalpha() and w.islower() and w not in banned))


@functools.lru_cache(maxsize=1)
def word_lists() -> WordLists:
    """wonderwords' nouns, adjectives and verbs (profanity removed), else generated pseudo-words."""
    spec = importlib.util.find_spec("wonderwords")
    if spec is not None and spec.submodule_search_locations:
        assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
        try:
            read = {n: (assets / f"{n}list.txt").read_text(encoding="utf-8").splitlines()
                    for n in ("noun", "adjective", "verb")}
            banned_path = assets / "profanitylist.txt"
            banned = set(banned_path.read_text(encoding="utf-8").split()) if banned_path.is_file() else set()
            lists = WordLists(_clean(read["noun"], banned), _clean(read["adjective"], banned),
                              _clean(read["verb"], banned), "wonderwords")
            if min(len(lists.nouns), len(lists.adjectives), len(lists.verbs)) >= 100:
                return lists
        except OSError as e:
            log.warning("cannot read wonderwords' word lists (%s); using generated pseudo-words", e)
    else:
        log.info("wonderwords is not installed; keys and word lists are generated pseudo-words "
                 "(`pip install wonderwords` for English words)")
    return _generated()


def _generated() -> WordLists:
    """6,000 distinct pseudo-words of 2-3 consonant-vowel syllables from a constant seed."""
    rng = random.Random(FALLBACK_SEED)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: dict[str, None] = {}
    while len(words) < 6000:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.choice((2, 3))))
        words.setdefault(word + rng.choice(("", "n", "r", "s")))
    pool = list(words)
    return WordLists(tuple(sorted(pool[:4000])), tuple(sorted(pool[4000:5000])), tuple(sorted(pool[5000:])),
                     "generated")


def _draw(rng: random.Random, make, n: int, avoid: str, taken: set[str], nested: bool = False) -> list[str]:
    """``n`` new items from ``make()``: not in ``taken`` (which grows), not in ``avoid``, and with ``nested``
    (items of different lengths) none a substring of another, so string matching cannot confuse them."""
    out: list[str] = []
    for _ in range(100 * n + 100):
        if len(out) == n:
            return out
        item = make()
        if item in taken or item in avoid or (nested and any(item in t or t in item for t in taken)):
            continue
        taken.add(item)
        out.append(item)
    raise RuntimeError(f"could not draw {n} distinct items that avoid the haystack")  # unreachable


def keys(rng: random.Random, n: int, avoid: str = "", taken: set[str] | None = None) -> list[str]:
    """``n`` distinct ``adjective-noun`` keys (RULER's word keys), e.g. ``"tasteful-grape"``."""
    lists = word_lists()
    return _draw(rng, lambda: f"{rng.choice(lists.adjectives)}-{rng.choice(lists.nouns)}", n, avoid,
                 set() if taken is None else taken, nested=True)


def numbers(rng: random.Random, n: int, avoid: str = "", taken: set[str] | None = None,
            digits: int = 5) -> list[str]:
    """``n`` distinct ``digits``-digit numbers (as strings), none occurring in ``avoid``."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return _draw(rng, lambda: str(rng.randint(lo, hi)), n, avoid, set() if taken is None else taken)


def variables(rng: random.Random, n: int, avoid: str = "", letters: int = 5) -> list[str]:
    """``n`` distinct upper-case variable names of ``letters`` letters (RULER's variable tracking)."""
    return _draw(rng, lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), n, avoid, set())


def coded_words(rng: random.Random, n: int, letters: int = 6) -> list[str]:
    """``n`` distinct random lower-case strings of ``letters`` letters (RULER's frequent-words vocabulary)."""
    return _draw(rng, lambda: "".join(rng.choices(string.ascii_lowercase, k=letters)), n, "", set())
