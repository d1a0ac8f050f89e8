"""The dual cache of lossless decoding: a compressed draft view and the full view in a slower tier.

After VeriCache ("VeriCache: Turning Lossy KV Cache into Lossless LLM Inference", 2026): drafts are
cheap reads of the compressed cache; every verification reads the full cache, and the exact KV the
verify pass computed for the accepted tokens is written into *both* views, so the draft view never
drifts from what full-cache decoding would hold (it only lacks the evicted entries).

Contract (the lossless decoder, ``speculative/lossless.py``, is the only caller):

1. The request's prefill (``engine/prefill.py``) fills a full cache once (letting the compressor
   observe) and compresses a copy into the draft view; :meth:`DualCache.open` moves the full cache
   into its :class:`FullView` and copies the question's exact KV into the draft view.
2. Per round: :meth:`DualCache.begin` marks both views; a drafter may append speculative tokens to
   the draft view; :meth:`DualCache.verify` appends the pending token and the draft to the full view
   in one forward pass and returns their logits; :meth:`DualCache.commit` keeps the accepted tokens
   in the full view, drops every speculative entry of the draft view and writes the full view's exact
   KV of the accepted tokens into it (then lets a decode-phase compressor evict to its budget).
3. A full view that cannot be read raises :class:`FullViewUnavailable`; the loop then falls back to
   plain full-cache decoding and never emits an unverified token.

Shapes: both views hold one sequence; ``verify`` takes ``T`` token ids and returns logits
``[T, vocab]``.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from ..cache import CacheMark, KVLayer, SlimCache
from ..compressors import Compressor
from ..engine.runner import ModelRunner
from ..errors import SlimKVError
from .tree import check_parents, depths, visibility

log = logging.getLogger(__name__)


class FullViewUnavailable(SlimKVError):
    """The full view's tier cannot be read; lossless decoding must not go on with it."""


class FullView(ABC):
    """Where the full (uncompressed) cache lives between verify passes.

    Contract: ``open(cache, room)`` once, taking ownership of the prefilled full cache (``room``:
    tokens it will still grow by); ``cache()`` before every verify pass, returning the
    :class:`SlimCache` to run the pass on or raising :class:`FullViewUnavailable`; ``nbytes()`` and
    ``location`` for reports; ``close()`` last.
    """

    location: str = "memory"

    @abstractmethod
    def open(self, cache: SlimCache, room: int) -> None: ...

    @abstractmethod
    def cache(self) -> SlimCache: ...

    def nbytes(self) -> int:
        return self.cache().stats().bytes_kept

    def memory_bytes(self) -> int:
        """Bytes the view holds in memory (what the KV pool counts; a view in files holds none)."""
        return 0

    def detach(self) -> SlimCache | None:
        """Hand over the in-memory cache (the request is being parked), or None if it lives elsewhere."""
        return None

    def attach(self, cache: SlimCache | None) -> None:
        """Take back what :meth:`detach` handed over."""

    def close(self) -> None:
        """Release the tier's resources."""


class MemoryFullView(FullView):
    """The full view in host memory, apart from the draft view (the CPU machine's slower tier)."""

    location = "memory"

    def __init__(self) -> None:
        self._cache: SlimCache | None = None

    def open(self, cache: SlimCache, room: int) -> None:
        cache.reserve(room)
        self._cache = cache

    def cache(self) -> SlimCache:
        if self._cache is None:
            raise FullViewUnavailable("the full view was never opened")
        return self._cache

    def memory_bytes(self) -> int:
        return 0 if self._cache is None else self._cache.nbytes()

    def detach(self) -> SlimCache | None:
        cache, self._cache = self._cache, None
        return cache

    def attach(self, cache: SlimCache | None) -> None:
        self._cache = cache


class DiskFullView(MemoryFullView):
    """The full view in memory-mapped files, one per layer, for contexts that do not fit in memory.

    Each layer's keys, values and positions are moved into a file under ``directory`` sized for the
    prompt plus ``room`` tokens; the operating system pages them in for each verify pass. The files
    are deleted on ``close``. A file that disappears or cannot be mapped raises
    :class:`FullViewUnavailable`.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.location = f"disk:{self.directory}"
        self._files: list[Path] = []

    def open(self, cache: SlimCache, room: int) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for i, layer in enumerate(cache.layers):
                if not isinstance(layer, KVLayer):
                    raise FullViewUnavailable("only a dense full cache can be moved into mapped files")
                path = self.directory / f"full-view-{os.getpid()}-{id(self)}-layer{i}.kv"
                layer.rehome(layer.max_length + room, _file_allocator(path))
                self._files.append(path)
        except OSError as exc:
            raise FullViewUnavailable(f"cannot write the full view under {self.directory}: {exc}") from exc
        self._cache = cache

    def cache(self) -> SlimCache:
        missing = [p for p in self._files if not p.exists()]
        if missing:
            raise FullViewUnavailable(f"full-view file {missing[0]} is gone")
        return super().cache()

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self._files if p.exists())

    def memory_bytes(self) -> int:
        return 0  # in files, outside the KV pool

    def detach(self) -> SlimCache | None:
        return None  # already in files, outside the KV pool

    def attach(self, cache: SlimCache | None) -> None:
        pass

    def close(self) -> None:
        for p in self._files:
            p.unlink(missing_ok=True)
        self._files.clear()


def _file_allocator(path: Path):
    """Allocator handing out consecutive pieces of one shared memory-mapped file."""
    pieces: list[tuple[tuple[int, ...], torch.dtype]] = []

    def alloc(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[Tensor]:
        pieces.extend(specs)
        total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in specs)
        with open(path, "wb") as f:
            f.truncate(total)
        raw = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
        out, offset = [], 0
        for shape, dtype in specs:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append(raw[offset : offset + n].view(dtype).view(shape))
            offset += n
        return out

    return alloc


class DualCache:
    """The draft view (compressed, fast tier) and the full view (slower tier) of one sequence.

    draft: the compressed cache drafts read; full: the full view verification reads
    compressor: the method that shrinks the draft view (decode-phase eviction after each commit)
    runner: the model both views belong to
    """

    def __init__(self, draft: SlimCache, full: FullView, compressor: Compressor | None, runner: ModelRunner) -> None:
        self.draft = draft
        self.full = full
        self.compressor = compressor
        self.runner = runner
        self._draft_mark: CacheMark | None = None
        self._full_mark: CacheMark | None = None
        self._verified: SlimCache | None = None  # the full view the last verify pass ran on

    @property
    def seen(self) -> int:
        """Tokens both views hold (the position of the pending token)."""
        return self.draft.seen

    def open(self, cache: SlimCache, question: int, room: int) -> None:
        """Take the full cache of the whole prompt (the draft view holds its compressed context): the
        question's ``question`` tokens are copied into the draft view, and both views get ``room``
        tokens of room (the answer and one draft), so no growth block is added while decoding."""
        if question:
            self.copy_tail(cache, question)
        self.draft.reserve(room)
        self.full.open(cache, room)

    def begin(self) -> None:
        """Mark both views before a round's speculative appends."""
        self._draft_mark = self.draft.mark()
        self._full_mark = None

    def verify(self, tokens: list[int], parents: list[int] | None = None) -> Tensor:
        """One forward pass of ``tokens`` (pending token + draft) over the full view -> ``[T, vocab]``.

        parents: the draft as a token tree (``speculative/tree.py``; indices into ``tokens[1:]``), or None for
                 a chain. Tree tokens sit at ``seen + depth`` and see only their ancestors.
        """
        cache = self._verified = self.full.cache()
        self._full_mark = cache.mark()
        first = cache.seen
        if parents is None:
            positions, tree = None, None
        else:
            check_parents(parents)
            positions = [first, *(first + d for d in depths(parents))]
            tree = visibility(parents).to(self.runner.device)
        row = self.runner.row(cache, tokens, None, "decode", positions=positions, tree=tree)
        logits = self.runner.forward([row], all_logits=True)
        return logits[0]

    @torch.inference_mode()
    def commit(self, kept: int, select: list[int] | None = None) -> None:
        """Keep the first ``kept`` verified tokens in both views; forget every other speculative entry.

        select: for a token tree, the offsets (into the verified tokens) of the ``kept`` tokens on the
                accepted path, pending token first
        """
        assert self._draft_mark is not None and self._full_mark is not None, "commit needs begin and verify"
        full = self._verified
        full.rollback(self._full_mark, kept, select)
        self.draft.rollback(self._draft_mark)
        self.copy_tail(full, kept)
        self._draft_mark = self._full_mark = self._verified = None

    @torch.inference_mode()
    def copy_tail(self, full: SlimCache, tokens: int) -> None:
        """Append the full view's last ``tokens`` entries (exact KV) to the draft view, then evict."""
        for src, dst in zip(full.layers, self.draft.layers):
            keys, values, positions = src.view()  # [1, H, L, D], [1, H, L, D], [1, H, L]
            n = src.max_length
            dst.append(keys[:, :, n - tokens : n], values[:, :, n - tokens : n], positions[:, 0, n - tokens : n])
        self.draft.seen += tokens
        comp = self.compressor
        if comp is not None and comp.active("decode"):
            self.runner.compress(self.draft, comp, "decode")

    def nbytes(self) -> int:
        """Bytes both views hold in memory (a full view in files is not counted)."""
        return self.draft.nbytes() + self.full.memory_bytes()


def make_full_view(spec: str) -> FullView:
    """``"memory"`` or ``"disk:DIR"`` (see :class:`~slimkv.engine.LosslessConfig`)."""
    if spec == "memory":
        return MemoryFullView()
    return DiskFullView(spec.removeprefix("disk:"))
