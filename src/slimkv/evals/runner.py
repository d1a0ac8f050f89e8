"""The evaluation runner: prefill once per sample, compress and answer once per configuration.

For every sample the prompt is prefilled once with the full cache while *every* method under test
observes it (SnapKV keeps its window queries, H2O its attention mass, ...). Each configuration then
gets a clone of that cache, compresses it with its method and ratio, appends the question (in the
question-agnostic setting) and decodes the answer greedily. The full cache (``none``) runs on the same
samples, so every score sits next to ``full_score`` measured on identical inputs.

Results are appended as JSON lines as soon as each one is known; a run that finds the file already
holding some of its results skips them (an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..compressors import Compressor, make_compressor
from ..engine import Engine, GenerationConfig, Segments
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
        if self.name == "none":
            return "none"
        return f"{self.name}@{self.ratio}" if self.budget is None else f"{self.name}#{self.budget}"


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
class Runner:
    """Evaluates several methods on the same samples with one prefill per sample.

    engine: the engine of the model under test (its own compressor is ignored)
    max_new_tokens: answer length; out: JSON-lines file results are appended to (resumable)
    run: a label stored with every result (the resume key includes it: different haystacks, seeds
         or templates get different labels)
    """

    engine: Engine
    max_new_tokens: int = 16
    out: Path | None = None
    run: str = ""
    _done: set = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if self.out is not None and self.out.exists():
            for line in self.out.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self._done.add(EvalResult(**row).key())

    def evaluate(self, samples: Iterable[EvalSample], methods: list[MethodSpec], question_aware: bool,
                 on_result: Callable[[EvalResult], None] | None = None) -> list[EvalResult]:
        """Every sample under every method (``none`` is added when missing); returns all results."""
        if not any(m.name == "none" for m in methods):
            methods = [MethodSpec("none"), *methods]
        compressors = {m: m.build() for m in methods}
        results: list[EvalResult] = []
        for sample in samples:
            todo = [m for m in methods if self._key(sample, m, question_aware) not in self._done]
            if not todo:
                continue
            results += self._sample(sample, todo, compressors, question_aware, on_result)
        return results

    def _key(self, sample: EvalSample, m: MethodSpec, qa: bool) -> tuple:
        return (self.run, sample.task, sample.length, sample.index, m.name, m.ratio, m.budget, qa)

    def _sample(self, sample: EvalSample, methods: list[MethodSpec], compressors: dict,
                question_aware: bool, on_result) -> list[EvalResult]:
        engine = self.engine
        tok = engine.tokenizer
        if question_aware:
            segments = Segments(tok.encode(sample.context + sample.question), [])
        else:
            segments = Segments(tok.encode(sample.context), tok.encode(sample.question, add_special_tokens=False))
        engine.check_length(segments)
        observers = tuple(c for c in compressors.values() if c.active("prefill"))
        t0 = time.perf_counter()
        with engine.adapter.attached():
            base = engine.new_cache()
            base_logits = engine.prefill(base, segments.context, observers=observers)
        shared = time.perf_counter() - t0
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, stop=("\n",))
        out = []
        for m in methods:
            t1 = time.perf_counter()
            comp = compressors[m]
            runner = engine.with_compressor(comp)
            cache = base.clone()
            with engine.adapter.attached():
                runner.compress(cache, "prefill")
                logits = base_logits
                if segments.question:
                    logits = runner.prefill(cache, segments.question, observers=())
            result = runner.continue_from(cache, logits, segments, config)
            row = EvalResult(
                task=sample.task, length=sample.length, index=sample.index, method=m.name, ratio=m.ratio,
                budget=m.budget, question_aware=question_aware,
                score=string_match(result.text, sample.answers), answer=result.text,
                expected=list(sample.answers), prompt_tokens=segments.total, depth=sample.depth,
                bytes_full=result.cache_after_prefill.bytes_full,
                bytes_kept=result.cache_after_prefill.bytes_kept,
                seconds=round(time.perf_counter() - t1 + shared / len(methods), 3), run=self.run,
            )
            self._record(row)
            if on_result is not None:
                on_result(row)
            out.append(row)
        return out

    def _record(self, row: EvalResult) -> None:
        self._done.add(row.key())
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("a") as f:
                f.write(json.dumps(dataclasses.asdict(row)) + "\n")
