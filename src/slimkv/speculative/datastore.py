"""REST's datastore: a suffix array over the token ids of a corpus, stored in one checksummed file.

After He et al., "REST: Retrieval-Based Speculative Decoding" (NAACL 2024, arXiv:2311.08252): find
the longest suffix of the current text that occurs in the corpus, collect the continuations that
follow its occurrences, and draft from them. :meth:`Datastore.tree` gives REST's token tree (the
best-supported nodes of the continuations' trie, verified together, ``speculative/tree.py``);
:meth:`Datastore.draft` its most frequent path (at each depth, the token most of the
still-consistent continuations take), verified like any chain draft.

Contract: ``slimkv datastore build FILES... --out PATH`` calls :func:`Datastore.build` then
:meth:`Datastore.save`; :class:`~slimkv.speculative.drafters.RestDrafter` calls :meth:`Datastore.load` once
and :meth:`Datastore.tree` (or :meth:`Datastore.draft`) once per round.

File (a :mod:`slimkv.store.frame` envelope, blake2b-checked, no pickle): the JSON header holds the
format, token and document counts and the tokenizer's fingerprint; the body holds ``tokens``
(int32, documents separated by -1) then ``suffixes`` (int32, the suffix array).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..store import frame
from ..store.errors import CorruptChunk
from .tree import build_tree

log = logging.getLogger(__name__)

KIND = "rest-datastore"
VERSION = 1
SEPARATOR = -1
#: Occurrences of a matched suffix looked at per draft (REST caps its candidates likewise).
MAX_OCCURRENCES = 256


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), so a datastore is used with its tokenizer only."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:32]


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start offsets of all suffixes of ``tokens`` ([n] ints) in lexicographic order (prefix doubling)."""
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64) + 1  # 0 means "past the end"
    step = 1
    while True:
        second = np.zeros(n, dtype=np.int64)
        if step < n:
            second[: n - step] = rank[step:]  # rank of the suffix `step` tokens later
        order = np.lexsort((second, rank))
        r1, r2 = rank[order], second[order]
        new_group = np.ones(n, dtype=np.int64)
        new_group[1:] = (r1[1:] != r1[:-1]) | (r2[1:] != r2[:-1])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.cumsum(new_group)
        if rank.max() == n or step >= n:
            return order.astype(np.int32)
        step *= 2


@dataclass
class Datastore:
    """Token ids of a corpus and their suffix array.

    tokens: [n] int32, documents separated by -1; suffixes: [n] int32 sorted suffix starts
    tokenizer: fingerprint of the tokenizer the ids come from
    """

    tokens: np.ndarray
    suffixes: np.ndarray
    tokenizer: str
    documents: int = 0

    @classmethod
    def build(cls, documents: list[list[int]], tokenizer: str) -> Datastore:
        parts: list[int] = []
        for doc in documents:
            parts.extend(doc)
            parts.append(SEPARATOR)
        tokens = np.asarray(parts, dtype=np.int32)
        return cls(tokens, suffix_array(tokens), tokenizer, len(documents))

    def save(self, path: str | Path) -> int:
        """Write the datastore (atomically); returns its size in bytes."""
        header = {"kind": KIND, "version": VERSION, "tokens": int(len(self.tokens)),
                  "documents": self.documents, "tokenizer": self.tokenizer}
        blob = frame.pack(header, [self.tokens.tobytes(), self.suffixes.tobytes()])
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        return len(blob)

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"datastore {path!r} does not exist; build one with `slimkv datastore build`")
        try:
            header, body = frame.unpack(p.read_bytes())
        except CorruptChunk as exc:
            raise InputError(f"datastore {path!r} is not a readable slimkv datastore: {exc}") from exc
        if header.get("kind") != KIND or header.get("version") != VERSION:
            raise InputError(f"{path!r} is not a slimkv datastore of version {VERSION}")
        n = int(header["tokens"])
        data = np.frombuffer(body, dtype=np.int32)
        if len(data) != 2 * n:
            raise InputError(f"datastore {path!r} holds {len(data)} ids, expected {2 * n}")
        return cls(data[:n], data[n:], str(header["tokenizer"]), int(header.get("documents", 0)))

    def check_tokenizer(self, fingerprint: str) -> None:
        if fingerprint != self.tokenizer:
            raise ConfigError("the REST datastore was built with another tokenizer; rebuild it with this model "
                              "(`slimkv datastore build FILES... --model ...`)")

    # ------------------------------------------------------------------ lookup
    def _range(self, pattern: list[int]) -> tuple[int, int]:
        """Suffix-array range [lo, hi) of the suffixes starting with ``pattern``."""
        tokens, sa, m = self.tokens, self.suffixes, len(pattern)
        target = tuple(pattern)

        def prefix(i: int) -> tuple[int, ...]:
            s = int(sa[i])
            return tuple(tokens[s : s + m].tolist())

        lo, hi = 0, len(sa)
        while lo < hi:  # first suffix >= pattern
            mid = (lo + hi) // 2
            if prefix(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        start, hi = lo, len(sa)
        while lo < hi:  # first suffix whose prefix > pattern
            mid = (lo + hi) // 2
            if prefix(mid) <= target:
                lo = mid + 1
            else:
                hi = mid
        return start, lo

    def continuations(self, suffix: list[int], limit: int, min_match: int = 1) -> tuple[int, list[list[int]]]:
        """(match length, what follows each occurrence, at most ``limit`` tokens) for the longest
        suffix of ``suffix`` found (at least ``min_match`` tokens); (0, []) if none."""
        if limit <= 0:
            return 0, []
        for m in range(len(suffix), min_match - 1, -1):
            lo, hi = self._range(suffix[len(suffix) - m :])
            if hi <= lo:
                continue
            starts = self.suffixes[lo : min(hi, lo + MAX_OCCURRENCES)].astype(np.int64) + m
            conts = [self.tokens[s : s + limit].tolist() for s in starts]
            conts = [c[: c.index(SEPARATOR)] if SEPARATOR in c else c for c in conts]
            conts = [c for c in conts if c]
            if conts:
                return m, conts
        return 0, []

    def tree(self, suffix: list[int], limit: int, nodes: int, min_match: int = 1) -> tuple[int, list[int], list[int]]:
        """(match length, tokens, parents): REST's token tree of at most ``nodes`` tokens, ``limit`` deep."""
        match, conts = self.continuations(suffix, limit, min_match)
        if not conts:
            return 0, [], []
        tokens, parents = build_tree(conts, nodes)
        return match, tokens, parents

    def draft(self, suffix: list[int], limit: int, min_match: int = 1) -> tuple[int, list[int]]:
        """(match length, draft) for the longest suffix of ``suffix`` found; (0, []) if none.

        The draft is the most frequent path of the continuations' token tree, at most ``limit`` long.
        """
        match, conts = self.continuations(suffix, limit, min_match)
        path: list[int] = []
        while conts and len(path) < limit:
            depth = len(path)
            nexts = [c[depth] for c in conts if len(c) > depth]
            if not nexts:
                break
            values, counts = np.unique(nexts, return_counts=True)
            best = int(values[int(np.argmax(counts))])
            path.append(best)
            conts = [c for c in conts if len(c) > depth and c[depth] == best]
        return (match, path) if path else (0, [])
