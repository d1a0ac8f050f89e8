"""Scoring generated answers: RULER's string match.

A sample's expected answers are short strings (a number, a variable name, a word); a generated answer
scores the fraction of them it contains, ignoring case. RULER calls this ``string_match_all``; it is
the score of every synthetic task here (one answer: 0 or 1; four values: 0, 0.25, ... 1).
"""

from __future__ import annotations

from collections.abc import Iterable


def string_match(text: str, answers: Iterable[str] | str) -> float:
    """Fraction in [0, 1] of ``answers`` found in ``text`` as case-insensitive substrings.

    A single string counts as one answer. Duplicates count as often as they are listed. Raises
    ``ValueError`` for no answers (a sample without an expected answer cannot be scored).
    """
    expected = [answers] if isinstance(answers, str) else list(answers)
    if not expected:
        raise ValueError("string_match needs at least one expected answer, got none")
    found = text.lower()
    return sum(a.lower() in found for a in expected) / len(expected)
