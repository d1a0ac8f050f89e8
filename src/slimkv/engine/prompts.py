"""Turning a request's text into token segments: the part that may be compressed without seeing
the question (the context) and the part appended after compression (the question)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch

_SPLIT = "\u2063slimkv-split\u2063"  # invisible separator, never in user text

#: Conventional end-of-text tokens; generation stops at any that the vocabulary has.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "</s>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>")


@dataclass(frozen=True)
class Request:
    """One generation request.

    context: text compressed before the question is seen (question-agnostic), or the whole prompt
    question: text appended after compression; empty for a plain prompt (then the whole prompt is
              compressed, which is the question-aware setting when it contains the question)
    chat: wrap context + question as one user message in the model's chat template
    """

    context: str
    question: str = ""
    chat: bool = False


@dataclass(frozen=True)
class Segments:
    """Token ids of a request: ``context`` is compressed, ``question`` follows it uncompressed."""

    context: list[int]
    question: list[int]

    @property
    def total(self) -> int:
        return len(self.context) + len(self.question)


def tokenize(tokenizer, request: Request) -> Segments:
    """Token segments of a request (chat template applied when asked)."""
    if not (request.context + request.question).strip():
        raise InputError("the prompt is empty; give some text to generate from")
    if request.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("this model's tokenizer has no chat template; run without --chat")
        content = request.context + _SPLIT + request.question
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(_SPLIT, 1)
        return Segments(
            context=tokenizer.encode(head, add_special_tokens=False),
            question=tokenizer.encode(tail, add_special_tokens=False),
        )
    context = tokenizer.encode(request.context, add_special_tokens=True)
    question = tokenizer.encode(request.question, add_special_tokens=False) if request.question else []
    return Segments(context=context, question=question)


def end_token_ids(tokenizer, model) -> set[int]:
    """Token ids that end a generation: the model's EOS ids plus conventional end-of-text tokens."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return ids


def punctuation_table(tokenizer, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` bool: tokens whose text is only punctuation (FastGen's punctuation policy)."""
    import string

    import torch

    ids = list(range(vocab_size))
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode([[i] for i in ids])
    else:
        texts = [tokenizer.decode([i]) for i in ids]
    marks = set(string.punctuation) | {"\n"}
    return torch.tensor([bool(t.strip(" ")) and all(c in marks for c in t.strip(" ")) for t in texts])
