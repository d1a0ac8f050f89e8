"""The evaluation runner: prefill once per sample, compress and answer once per configuration.

For every sample the context is prefilled once with the full cache while *every* method under test
observes it (SnapKV keeps its window queries, H2O its attention mass, ...); the question-aware setting
continues that prefill with the question. Each configuration then gets a clone of the cache,
compresses it with its method and ratio, appends the question (in the question-agnostic setting), and
all configurations of the sample decode their answers greedily together as one batch. The full cache
(``none``) runs on the same samples, so every score sits next to ``full_score`` measured on identical
inputs.

Results are appended as JSON lines as soon as each one is known; a run that finds the file already
holding some of its results skips them (an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import CacheStats, SlimCache
from ..compressors import Compressor, make_compressor
from ..engine import Engine, Generation, GenerationConfig, Segments
from .scoring import string_match

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """One configuration under test: a registered method and its ratio or budget."""

    name: str
    ratio: float | None = None
    budget: int | None = None

    def build(self) -> Compressor:
        return make_compressor(self.name, ratio=self.ratio, budget=self.budget)

    @property
    def label(self) -> str:
        if self.budget is not None:
            return f"{self.name}#{self.budget}"
        return self.name if self.ratio is None else f"{self.name}@{self.ratio}"


@dataclass(frozen=True)
class EvalSample:
    """A prompt to answer: ``context`` (+ ``question``) and the strings a correct answer contains."""

    task: str
    length: int
    index: int
    context: str
    question: str
    answers: tuple[str, ...]
    depth: float | None = None


@dataclass(frozen=True)
class EvalResult:
    """One sample under one configuration (a JSON line of ``results.jsonl``)."""

    task: str
    length: int
    index: int
    method: str
    ratio: float | None
    budget: int | None
    question_aware: bool
    score: float
    answer: str
    expected: list[str]
    prompt_tokens: int
    depth: float | None
    bytes_full: int
    bytes_kept: int
    seconds: float
    run: str = ""

    def key(self) -> tuple:
        return (self.run, self.task, self.length, self.index, self.method, self.ratio, self.budget,
                self.question_aware)


@dataclass
class _Prepared:
    """A configuration's compressed cache, ready to answer (``seconds``: its share of the work so far)."""

    method: MethodSpec
    question_aware: bool
    cache: SlimCache
    logits: torch.Tensor
    stats: CacheStats
    seconds: float


@dataclass
class Runner:
    """Evaluates several methods on the same samples with one prefill per sample.

    engine: the engine of the model under test (its own compressor is ignored)
    max_new_tokens: answer length; out: JSON-lines file results are appended to (resumable)
    run: a label stored with every result (the resume key includes it: different haystacks, seeds
         or templates get different labels)
    batch_size: answers decoded together at most (configurations of one sample share a batch)
    """

    engine: Engine
    max_new_tokens: int = 16
    out: Path | None = None
    run: str = ""
    batch_size: int = 32
    _done: set = field(default_factory=set, init=False)
    _cut: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.out is not None and self.out.exists():
            text = self.out.read_text()
            self._cut = bool(text) and not text.endswith("\n")
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        self._done.add(EvalResult(**json.loads(line)).key())
                    except (ValueError, TypeError):  # a line cut short by an interrupted run: redo it
                        log.warning("%s line %d is not a complete result; it will be recomputed",
                                    self.out, number)

    def evaluate(self, samples: Iterable[EvalSample], methods: list[MethodSpec],
                 question_aware: bool | Sequence[bool] = False,
                 on_result: Callable[[EvalResult], None] | None = None) -> list[EvalResult]:
        """Every sample under every method (``none`` is added when missing); returns all results.

        question_aware: one setting, or several (``(False, True)``): the settings of a sample share
        the context's prefill, the question-aware one continues it with the question.
        """
        settings = (question_aware,) if isinstance(question_aware, bool) else tuple(question_aware)
        if not any(m.name == "none" for m in methods):
            methods = [MethodSpec("none"), *methods]
        compressors = {m: m.build() for m in methods}
        results: list[EvalResult] = []
        for sample in samples:
            todo = [(m, qa) for qa in settings for m in methods if self._key(sample, m, qa) not in self._done]
            if todo:
                results += self._sample(sample, todo, compressors, on_result)
        return results

    def _key(self, sample: EvalSample, m: MethodSpec, qa: bool) -> tuple:
        return (self.run, sample.task, sample.length, sample.index, m.name, m.ratio, m.budget, qa)

    def _sample(self, sample: EvalSample, todo: list[tuple[MethodSpec, bool]], compressors: dict,
                on_result) -> list[EvalResult]:
        """One prefill of the context, one compression per configuration, one batched decode."""
        engine = self.engine
        tok = engine.tokenizer
        context = tok.encode(sample.context)
        question = tok.encode(sample.question, add_special_tokens=False)
        segments = Segments(context, question)
        engine.check_length(segments)
        observers = tuple(c for c in (compressors[m] for m, _ in todo) if c.active("prefill"))
        for comp in {id(compressors[m]): compressors[m] for m, _ in todo}.values():
            engine.bind(comp)  # calibrations and RoPE tables, before any observing
        t0 = time.perf_counter()
        bases: dict[bool, tuple] = {}
        with engine.adapter.attached():
            base = engine.new_cache()
            logits = engine.prefill(base, context, observers=observers)
            if any(not qa for _, qa in todo):
                bases[False] = (base, logits)
            if any(qa for _, qa in todo):
                aware = base.clone() if False in bases else base
                bases[True] = (aware, engine.prefill(aware, question, observers=observers))
        shared = (time.perf_counter() - t0) / len(todo)
        prepared: list[_Prepared] = []
        for m, qa in todo:
            t1 = time.perf_counter()
            comp = compressors[m]
            runner = engine.with_compressor(comp)
            base_cache, base_logits = bases[qa]
            cache = base_cache.clone()
            with engine.adapter.attached():
                runner.compress(cache, "prefill")  # frees every state but what comp decodes with
                stats = cache.stats()
                logits = base_logits
                if not qa:
                    logits = runner.prefill(cache, question, observers=())
                if comp.active("decode"):
                    runner.compress(cache, "decode")
            prepared.append(_Prepared(m, qa, cache, logits, stats, time.perf_counter() - t1 + shared))
        answers = self._decode(prepared, segments, compressors)
        out = []
        for p, (text, seconds) in zip(prepared, answers):
            row = EvalResult(
                task=sample.task, length=sample.length, index=sample.index, method=p.method.name,
                ratio=p.method.ratio, budget=p.method.budget, question_aware=p.question_aware,
                score=string_match(text, sample.answers), answer=text,
                expected=list(sample.answers), prompt_tokens=segments.total, depth=sample.depth,
                bytes_full=p.stats.bytes_full, bytes_kept=p.stats.bytes_kept,
                seconds=round(p.seconds + seconds, 3), run=self.run,
            )
            self._record(row)
            if on_result is not None:
                on_result(row)
            out.append(row)
        return out

    def _decode(self, prepared: list[_Prepared], segments: Segments, compressors: dict) -> list[tuple[str, float]]:
        """Greedy answers of every prepared cache and the decode seconds charged to each.

        Every configuration is a request of the engine with its own compressor (decode-phase methods
        keep evicting) and its prepared cache (any layout); the scheduler decodes them together, at
        most ``batch_size`` at a time (decoding a small model is bound by reading its weights, so a
        batch costs about one sequence).
        """
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, stop=("\n",))
        answers: list[tuple[str, float]] = []
        for start in range(0, len(prepared), self.batch_size):
            group = prepared[start : start + self.batch_size]
            t0 = time.perf_counter()
            seqs = [self.engine.submit(segments, config, compressor=compressors[p.method], prepared=(p.cache, p.logits))
                    for p in group]
            gen = Generation(self.engine, seqs)
            for _ in gen:
                pass
            each = (time.perf_counter() - t0) / len(group)
            answers += [(result.text, each) for result in gen.results]
        return answers

    def _record(self, row: EvalResult) -> None:
        self._done.add(row.key())
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("a") as f:
                if self._cut:  # never append to the tail of a line cut short
                    f.write("\n")
                    self._cut = False
                f.write(json.dumps(dataclasses.asdict(row)) + "\n")
