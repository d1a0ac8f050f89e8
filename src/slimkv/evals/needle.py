"""Needle-in-a-haystack prompts (RULER niah_single style) on a repeated noise haystack.

The prompt shape follows ../shared/EVAL.md: raw text, the needle at a chosen depth, and a question
whose answer prefix makes the model complete the number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The special magic number is {value}. "
QUESTION = "\n\nQuestion: What is the special magic number? Answer: The special magic number is"


@dataclass(frozen=True)
class NeedleSample:
    """One needle task: ``context`` (haystack with needle), ``question`` and the expected ``answer``."""

    context: str
    question: str
    answer: str
    depth: float


def needle_sample(tokenizer, tokens: int, depth: float, seed: int = 0) -> NeedleSample:
    """A needle prompt of about ``tokens`` tokens with the needle at ``depth`` (0 = start, 1 = end)."""
    rng = random.Random(seed)
    value = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(value=value)
    per_repeat = len(tokenizer.encode(NOISE, add_special_tokens=False))
    overhead = len(tokenizer.encode(needle + QUESTION, add_special_tokens=False))
    repeats = max(1, round((tokens - overhead) / per_repeat))
    sentences = (NOISE * repeats).split(". ")
    cut = round(len(sentences) * depth)
    head, tail = ". ".join(sentences[:cut]), ". ".join(sentences[cut:])
    head = head + "." if head and not head.endswith(".") else head
    context = (head + needle + tail).strip()
    return NeedleSample(context=context, question=QUESTION, answer=value, depth=depth)
