"""A synchronous client of the scheduler: the requests of one ``Engine.stream`` call, stepped to the end.

Iterating a :class:`Generation` steps the engine's scheduler in the caller's thread (other requests
queued on the same engine advance too: they share the batch) and yields :class:`TextDelta` pieces of
its own requests as they come; ``results`` holds one :class:`GenerationResult` per request afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .results import GenerationResult, TextDelta
from .sequence import Sequence

if TYPE_CHECKING:
    from .engine import Engine

ProgressFn = Callable[[int, int], None]


class Generation:
    """An in-progress generation: iterate for text pieces; ``results`` holds the outcome afterwards."""

    def __init__(self, engine: Engine, sequences: list[Sequence]) -> None:
        self.engine = engine
        self.sequences = sequences
        self.results: list[GenerationResult] = []

    def __iter__(self) -> Iterator[TextDelta]:
        try:
            while True:
                for i, seq in enumerate(self.sequences):
                    piece = seq.piece()
                    if piece:
                        yield TextDelta(i, piece)
                failed = next((s for s in self.sequences if s.error is not None), None)
                if failed is not None:
                    raise failed.error  # type: ignore[misc]
                if all(seq.finished for seq in self.sequences):
                    break
                self.engine.step()
        finally:
            for seq in self.sequences:  # a caller that stops iterating cancels what is left
                if not seq.finished:
                    self.engine.scheduler.cancel(seq)
        self.results = [seq.result() for seq in self.sequences]

    def cancel(self) -> None:
        """Stop every request of this generation at the next step."""
        for seq in self.sequences:
            self.engine.scheduler.cancel(seq)
