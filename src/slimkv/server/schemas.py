"""The OpenAI wire shapes the server speaks (requests and responses), as pydantic models.

Requests refuse fields they do not know (``extra="forbid"``): a client that asks for something the
server does not do (``logprobs``, ``n`` > 1, tools, ...) gets a 400 naming the field, never a silently
different answer. Where OpenAI is silent, vLLM's choices are followed (``ignore_eos``, a usage chunk
after the last choice chunk when ``stream_options.include_usage``). slimkv's own extension is the
``kv_compression`` request field and the ``kv`` response field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVCompression(Strict):
    """Per-request KV compression (slimkv's extension; the server's default applies when absent).

    method: a registered compressor or a composition (``snapkv+kivi2``); ``none`` for the full cache
    ratio: fraction of entries removed, in [0, 1); budget: entries kept per layer and KV head
    phase: prefill, decode or both (default: the method's); lossless: verify every token against
    the full cache (the output is the full cache's)
    """

    method: str = "none"
    ratio: float | None = None
    budget: int | None = None
    phase: Literal["prefill", "decode", "both"] | None = None
    lossless: bool = False


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The generation fields the completions and chat endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    kv_compression: KVCompression | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=0)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt per request (a list of one string, or a string)")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class KVReport(BaseModel):
    """What the request's KV cache held at its end (slimkv's extension)."""

    method: str
    tokens_full: int
    tokens_kept: int
    bytes_full: int
    bytes_kept: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kv: KVReport | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    kv: KVReport | None = None


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    kv: KVReport | None = None
