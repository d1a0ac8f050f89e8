"""Haystack filler cut to a token length, with needles placed at depths, and the fit to a token budget.

A :class:`Filler` holds the haystack as *pieces* (each word with the whitespace after it) and the
pieces that start a sentence. ``render(count, inserts)`` joins the first ``count`` pieces and puts every
insert (a needle, a variable assignment) at the sentence start nearest its depth. :func:`fit` then finds
the largest amount of filler (pieces, words of a list, ...) whose prompt stays within the token budget.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ...errors import InputError
from ..haystacks import load_haystack, repeats

log = logging.getLogger(__name__)

MAX_SHIFT = 32  # pieces a needle may move to reach a sentence start; farther, it goes mid-sentence
_PIECE = re.compile(r"\S+\s*")
_SENTENCE_END = re.compile(r"""(?:[.!?]["'\u201d\u2019)\]]*\s+|\n\s*\n\s*)$""")


class Tokenizer(Protocol):
    """What the generators need of a tokenizer: ``encode(text) -> token ids`` (special tokens included)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Filler:
    """Haystack text as ``pieces`` (``"word "``: a word and its trailing whitespace).

    ``starts`` are the indices of pieces that begin a sentence or paragraph, ascending, 0 included.
    ``text`` is the pieces joined (what drawn values must not already contain).
    """

    name: str
    pieces: tuple[str, ...]
    starts: tuple[int, ...]

    @functools.cached_property
    def text(self) -> str:
        return "".join(self.pieces)

    def position(self, depth: float, count: int) -> int:
        """The insertion index for ``depth`` in [0, 1] of the first ``count`` pieces: the nearest sentence
        start (or the end), unless that is more than :data:`MAX_SHIFT` pieces away."""
        want = round(min(max(depth, 0.0), 1.0) * count)
        i = bisect.bisect_left(self.starts, want)
        near = [s for s in self.starts[max(i - 1, 0):i + 1] if s <= count] + [count]
        best = min(near, key=lambda s: abs(s - want))
        return best if abs(best - want) <= MAX_SHIFT else want

    def render(self, count: int, inserts: Sequence[tuple[float, str]] = ()) -> str:
        """The first ``count`` pieces with each ``(depth, text)`` insert placed at :meth:`position`.

        Inserts at the same place keep their given order (a variable chain stays in order). The result
        has no trailing whitespace.
        """
        at = sorted(((self.position(d, count), k, t.strip()) for k, (d, t) in enumerate(inserts)))
        out, done = [], 0
        for pos, _, text in at:
            out.append("".join(self.pieces[done:pos]))
            if out[-1] and not out[-1][-1].isspace():
                out.append(" ")
            out.append(text + " ")
            done = pos
        out.append("".join(self.pieces[done:count]))
        return "".join(out).rstrip()


def _pieces(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    pieces = tuple(_PIECE.findall(text))
    starts = (0, *(i for i in range(1, len(pieces)) if _SENTENCE_END.search(pieces[i - 1])))
    return pieces, starts


def make_filler(haystack: str, tokenizer: Tokenizer, tokens: int) -> Filler:
    """Enough of ``haystack`` for a prompt of ``tokens`` tokens (the haystack alone holds at least as many).

    ``noise`` is repeated as needed; real text is taken from its start and never repeated: when it holds
    fewer than ``tokens`` tokens this raises :class:`InputError` (with how many it does hold).
    """
    text = load_haystack(haystack)
    if repeats(haystack):
        unit = len(tokenizer.encode(text))
        text = text * (tokens // max(unit - 2, 1) + 2)
    else:
        chars = 8 * tokens
        while True:
            prefix = text[:chars]
            held = len(tokenizer.encode(prefix))
            if held >= tokens:
                text = prefix
                break
            if chars >= len(text):
                raise InputError(f"haystack {haystack!r} holds only {held} tokens of this tokenizer, fewer "
                                 f"than the {tokens} requested, and real text is never repeated; ask for at "
                                 f"most {held} tokens, or use a longer text or the `noise` haystack")
            chars *= 2
    pieces, starts = _pieces(text)
    return Filler(haystack, pieces, starts)


def fit(count: Callable[[int], int], target: int, lo: int, hi: int, guess: int | None = None,
        what: str = "prompt") -> int:
    """The largest ``x`` in [lo, hi] (near enough) with ``count(x) <= target``; ``count`` is the prompt's
    token count with ``x`` units of filler, increasing in ``x``.

    Stops once ``count(x)`` is within ``max(2, target // 200)`` tokens below ``target``. ``guess`` (the
    previous sample's answer) is tried first. Raises :class:`InputError` when the prompt without filler
    already takes more than half of ``target`` (too short a length for the task).
    """
    tol = max(2, target // 200)
    if guess is not None and lo <= guess <= hi:
        c = count(guess)
        if target - tol <= c <= target:
            return guess
    a, ca = lo, count(lo)
    if 2 * ca > target:
        raise InputError(f"a {target}-token {what} is too short: the instructions, needles and question "
                         f"alone take {ca} tokens; ask for at least {2 * ca} tokens")
    b, cb = hi, count(hi)
    if cb <= target:
        return hi
    steps = 0
    while b - a > 1 and target - ca > tol:
        steps += 1
        if steps % 3 == 0:  # bisect now and then so a lopsided interpolation cannot crawl
            x = (a + b) // 2
        else:
            x = min(max(a + round((target - ca) * (b - a) / (cb - ca)), a + 1), b - 1)
        c = count(x)
        if c <= target:
            a, ca = x, c
        else:
            b, cb = x, c
    return a
