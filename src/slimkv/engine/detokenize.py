"""Generated ids to streamed text: incremental detokenization, stop strings, held-back characters.

Decoding the whole output at every step costs time quadratic in its length. :class:`TextStream`
decodes a short window instead (the approach of Hugging Face's ``TextStreamer`` and vLLM's
incremental detokenizer): the text of ``ids[prefix:read]`` and of ``ids[prefix:]`` are decoded, and
what the second adds is new text, unless it ends in an incomplete character (a byte-level token
split), which waits for the next token. Both windows start at the same token, so tokenizers that
treat a leading token specially (SentencePiece's leading space) cancel out.

A stop string cuts the text where it starts and ends the sequence; until a piece can no longer grow
into a stop string, its last ``len(stop) - 1`` characters are held back.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one sequence's generated ids, streamed in pieces.

    tokenizer: anything with ``decode(ids, skip_special_tokens=True)``
    stops: stop strings (the text is cut where the first one starts)
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0  # first id of the decoding window
        self._read = 0  # ids whose text is in ``text``
        self._emitted = 0  # characters of ``text`` already streamed
        self._hold = max((len(s) - 1 for s in self.stops), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> None:
        """Append a generated id; its text (once complete) joins ``text``, a stop string ends it."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return  # nothing new yet, or an incomplete character: wait for the next id
        self._append(after[len(before) :])
        self._prefix, self._read = self._read, len(self.ids)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        cuts = [c for c in (self.text.find(s, start) for s in self.stops) if c >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True

    def finish(self) -> None:
        """The sequence ended: whatever its last ids decode to joins the text (even a partial character)."""
        if self.stopped:
            return
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before):
            self._append(after[len(before) :])
        self._read = len(self.ids)
        self._hold = 0

    def piece(self) -> str:
        """Text not streamed yet that can no longer become part of a stop string ("" if none)."""
        safe = len(self.text) if self.stopped or not self._hold else len(self.text) - self._hold
        if safe <= self._emitted:
            return ""
        out = self.text[self._emitted : safe]
        self._emitted = safe
        return out
