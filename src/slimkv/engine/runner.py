"""The model runner: one forward pass over the rows it is given, and what compressors bind to.

Contract: the scheduler (and the prefill of a request, the lossless decoder, the evaluation runner)
builds :class:`~slimkv.engine.forward.RowPass` rows with :meth:`ModelRunner.row` and runs them with
:meth:`ModelRunner.forward`, one pass, no loops: every row gives the same number of new tokens
(``[B, T]``), and each row's ``cache.seen`` advances by ``T`` afterwards. :class:`Bindings` holds the
model-bound data of every compressor used with this model (``Compressor.bind``), computed once each.

The runner is also the narrow model access compressors calibrate through
(:class:`~slimkv.compressors.base.ModelAccess`): ``new_cache``, ``prefill`` and ``extend``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ..cache import SlimCache
from ..compressors import Compressor
from ..compressors.base import QueryWatcher
from ..models.adapter import ModelAdapter
from .forward import BatchPass, RowPass
from .prompts import punctuation_table

log = logging.getLogger(__name__)


def binding_key(comp: Compressor) -> str:
    """What identifies a compressor's bound data: its class and every setting (``repr``)."""
    return f"{type(comp).__module__}.{comp!r}"


class Bindings:
    """The bound data (``Compressor.bind``) of every compressor used with one model."""

    def __init__(self, model: ModelRunner) -> None:
        self.model = model
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()

    def bind(self, comp: Compressor) -> Any:
        """Bind ``comp`` to the model if it is not yet (may run a calibration once); returns its data."""
        key = binding_key(comp)
        with self._lock:
            if key not in self._data:
                self._data[key] = comp.bind(self.model)
            return self._data[key]

    def get(self, comp: Compressor) -> Any:
        key = binding_key(comp)
        if key in self._data:
            return self._data[key]
        log.debug("binding %s on first use", comp.describe())
        return self.bind(comp)


class _Watched:
    """An attention sink that shows every layer's queries to a watcher, then attends as ``inner``."""

    def __init__(self, inner: BatchPass, watch: QueryWatcher) -> None:
        self.inner, self.watch = inner, watch

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
               sliding_window: int | None, softcap: float | None) -> Tensor:
        self.watch(layer_idx, query, self.inner.rows[0].positions)
        return self.inner.attend(layer_idx, query, key, value, scale, sliding_window, softcap)


class ModelRunner:
    """Forward passes of one model over slimkv caches (see the module docstring).

    adapter: the model; tokenizer: its tokenizer (punctuation flags, calibration text)
    prefill_chunk: prompt tokens per pass when a whole prompt is prefilled at once
    """

    def __init__(self, adapter: ModelAdapter, tokenizer: Any, prefill_chunk: int = 4096) -> None:
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.bindings = Bindings(self)
        self._punct_table: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def new_cache(self) -> SlimCache:
        return SlimCache(self.adapter.spec)

    # ------------------------------------------------------------------ rows and passes
    def punctuation(self, ids: list[int], observers: tuple[Compressor, ...], phase: str) -> Tensor | None:
        """[1, T] punctuation flags of ``ids`` when a recorder needs them (FastGen), else None."""
        if not any(r.needs_punctuation for o in observers for r in o.recorders(phase)):
            return None
        if self._punct_table is None:  # one pass over the vocabulary per model
            vocab = self.adapter.model.get_input_embeddings().num_embeddings
            self._punct_table = punctuation_table(self.tokenizer, vocab)
        table = self._punct_table
        index = torch.tensor(ids, dtype=torch.long).clamp(max=table.numel() - 1)
        return table[index][None].to(self.device)

    def row(self, cache: SlimCache, ids: list[int], compressor: Compressor | None = None,
            phase: Literal["prefill", "decode"] = "prefill", observers: tuple[Compressor, ...] | None = None,
            positions: list[int] | None = None, tree: Tensor | None = None) -> tuple[RowPass, list[int]]:
        """One row of a pass: ``ids`` appended to ``cache`` at ``positions`` (default: the next ones)."""
        watching = observers if observers is not None else ((compressor,) if compressor is not None else ())
        if positions is None:
            positions = list(range(cache.seen, cache.seen + len(ids)))
        pos = torch.tensor([positions], device=self.device)  # [1, T]
        row = RowPass(cache, pos, compressor, phase, observers, self.punctuation(ids, watching, phase), tree,
                      self.bindings.get)
        return row, ids

    @torch.inference_mode()
    def forward(self, rows: list[tuple[RowPass, list[int]]], all_logits: bool = False,
                watch: QueryWatcher | None = None) -> Tensor:
        """One forward pass; returns logits ``[B, T, vocab]`` (``all_logits``) or ``[B, 1, vocab]``.

        Every row's ``cache.seen`` advances by its ``T`` tokens.
        """
        ids = torch.tensor([r[1] for r in rows], device=self.device)  # [B, T]
        positions = torch.cat([r[0].positions for r in rows])  # [B, T]
        sink: Any = BatchPass([r[0] for r in rows])
        if watch is not None:
            sink = _Watched(sink, watch)
        with self.adapter.attached():
            logits = self.adapter.forward(ids, positions, sink, all_logits=all_logits)
        for row, tokens in rows:
            row.cache.seen += len(tokens)
        return logits

    def compress(self, cache: SlimCache, compressor: Compressor | None, phase: Literal["prefill", "decode"]) -> None:
        """Shrink ``cache`` to ``compressor``'s target for the tokens it has seen (see ``RowPass.compress``)."""
        if compressor is None:
            return
        row = RowPass(cache, torch.empty(1, 0, dtype=torch.long), compressor, phase, (), None, None,
                      self.bindings.get)
        with torch.inference_mode():
            row.compress()

    # ------------------------------------------------------------------ whole prompts (ModelAccess)
    def prefill(self, cache: SlimCache, ids: list[int], observers: tuple[Compressor, ...] = (),
                progress: Callable[[int, int], None] | None = None) -> Tensor:
        """Feed ``ids`` to ``cache`` in ``prefill_chunk`` chunks (no compression); last logits [1, vocab].

        observers: methods recording what they need (one prefill can serve several methods)
        progress: called with (tokens done, total) after every chunk
        """
        if not ids:
            raise ValueError("nothing to prefill")
        cache.reserve(len(ids))
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            logits = self.forward([self.row(cache, chunk, None, "prefill", observers)])
            if progress is not None:
                progress(start + len(chunk), len(ids))
        assert logits is not None
        return logits[:, -1]

    def extend(self, cache: SlimCache, ids: list[int], all_logits: bool = False,
               watch: QueryWatcher | None = None) -> Tensor:
        """One pass appending ``ids`` to ``cache`` (full cache); logits [1, T or 1, vocab]."""
        return self.forward([self.row(cache, ids, None, "prefill", ())], all_logits=all_logits, watch=watch)
