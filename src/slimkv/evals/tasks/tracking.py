"""Variable tracking (RULER's ``vt``): follow chains of assignments hidden in the haystack.

A chain ``VAR ABCDE = 12345.``, ``VAR FGHIJ = VAR ABCDE.``, ... is inserted in order at random depths;
the question gives the value and the answer names every variable of its chain.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from . import words
from .base import Draft, Setup, Task, Templates, frame


@dataclass(frozen=True)
class VariableTracking(Task):
    """``chains`` chains of ``hops`` hops (``hops + 1`` variables each); the first chain is asked."""

    chains: int = 1
    hops: int = 4
    preamble: str = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"

    def draft(self, rng: random.Random, depth: float | None, setup: Setup) -> Draft:
        filler, t = setup.filler, setup.templates
        avoid = filler.text
        span = self.hops + 1
        names = words.variables(rng, self.chains * span, avoid)
        values = words.numbers(rng, self.chains, avoid)
        inserts = []
        for c in range(self.chains):
            chain = names[c * span:(c + 1) * span]
            statements = [f"VAR {chain[0]} = {values[c]}."]
            statements += [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
            inserts += zip(sorted(rng.random() for _ in statements), statements)  # in order along the text
        fields = {"value": values[0], "count": span}
        question = frame(t.question.format(**fields), t.answer_prefix.format(**fields))
        preamble = self.preamble
        return Draft(lambda x: preamble + filler.render(x, inserts), question, tuple(names[:span]), 0,
                     len(filler.pieces))


TRACKING = (
    VariableTracking("vt", "variable tracking: name every variable that a chain of assignments gives a value "
                           "(RULER vt)",
                     Templates(None,
                               "Find all variables that are assigned the value {value} in the text above.",
                               "According to the chain(s) of variable assignment in the text above, {count} "
                               "variables are assigned the value {value}, they are:"),
                     question_fields=(("value", False), ("count", False))),
)
