"""The HTTP API: OpenAI's completions and chat completions over the engine loop, per-request KV compression.

Contract: :func:`create_app` builds a FastAPI app over an :class:`~slimkv.engine.service.EngineLoop`
(which owns the engine's steps on its own thread; handlers only submit, await pieces and cancel, so
the event loop never blocks on the model). Routes: ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Every error is OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``) with a 4xx
status that says what to fix: malformed JSON, unknown or mistyped fields, a bad method, a prompt
longer than the model's context, ``max_tokens`` beyond it, a missing or unknown key (401), a full
queue (429 with ``Retry-After``), a request that ran past its time limit (408). A client that
disconnects cancels its request; its KV is freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from ..compressors import Compressor, make_compressor
from ..engine import GenerationConfig, GenerationResult, LosslessConfig, SamplingConfig, Segments
from ..engine.service import EngineClosed, EngineLoop, QueueFull, RequestHandle
from ..errors import SlimKVError
from .auth import tenant_of
from .metrics import Metrics
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    KVCompression,
    KVReport,
    PromptTokensDetails,
    Sampling,
    Usage,
)

log = logging.getLogger(__name__)

#: engine finish reasons as OpenAI names them
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class ServerSettings:
    """How the server answers.

    model_name: the name ``/v1/models`` lists and requests may give in ``model``
    default: the compression requests without ``kv_compression`` get
    api_keys: ``{key: tenant}`` (None: no authentication, no tenants)
    timeout: seconds a request may run before it is cancelled (408)
    retry_after: seconds a 429 asks the client to wait
    """

    model_name: str
    default: KVCompression = field(default_factory=KVCompression)
    api_keys: dict[str, str] | None = None
    timeout: float = 600.0
    retry_after: int = 2


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(loop: EngineLoop, settings: ServerSettings, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The server's app over ``loop`` (see the module docstring).

    on_shutdown: called once the server stopped taking requests and answered those in flight
    (``slimkv serve`` drains the engine loop and closes the store there)
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="slimkv", version="0.1.0", lifespan=lifespan)
    engine = loop.engine
    metrics = Metrics(loop)
    app.state.loop, app.state.metrics = loop, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif first.get("type") == "extra_forbidden":
            message = f"unsupported field {'.'.join(where)!r}: this server does not implement it"
        else:
            message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
        return ApiError(400, message, param=".".join(where) or None).response()

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if request.url.path.startswith("/v1/") and request.method == "POST":
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def tenant(request: Request) -> str | None:
        if settings.api_keys is None:
            return None
        found = tenant_of(settings.api_keys, request.headers.get("authorization"))
        if found is None:
            raise ApiError(401, "a valid API key is required: send `Authorization: Bearer KEY`",
                           kind="authentication_error", code="invalid_api_key")
        return found

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    def compressor(spec: KVCompression | None) -> tuple[Compressor | None, str, bool]:
        spec = spec or settings.default
        if spec.method == "none":
            return None, "none", spec.lossless
        try:
            comp = make_compressor(spec.method, ratio=spec.ratio, budget=spec.budget, phase=spec.phase)
        except SlimKVError as exc:
            raise ApiError(400, f"kv_compression: {exc}", param="kv_compression.method") from exc
        return comp, comp.describe(), spec.lossless

    def config(body: Sampling, prompt_tokens: int, limit: int | None) -> GenerationConfig:
        room = engine.adapter.max_positions - prompt_tokens
        if limit is not None and limit > room:
            raise ApiError(400, f"max_tokens is {limit}, but the prompt has {prompt_tokens} tokens and the model's "
                                f"context is {engine.adapter.max_positions}: at most {room} new tokens fit",
                           param="max_tokens")
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        sampling = SamplingConfig(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=seed)
        return GenerationConfig(max_new_tokens=room if limit is None else limit, sampling=sampling,
                                stop=body.stops(), ignore_eos=body.ignore_eos)

    async def submit(request: Request, body: Sampling, segments: Segments, limit: int | None) -> tuple[RequestHandle, str]:
        check_model(body.model)
        who = tenant(request)
        if segments.total == 0:
            raise ApiError(400, "the prompt is empty; give some text to complete", param="prompt")
        if segments.total >= engine.adapter.max_positions:
            raise ApiError(400, f"the prompt has {segments.total} tokens but the model's context is "
                                f"{engine.adapter.max_positions} tokens; shorten it", param="prompt",
                           code="context_length_exceeded")
        comp, described, lossless = compressor(body.kv_compression)
        cfg = config(body, segments.total, limit)
        if lossless:
            cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, stop=cfg.stop,
                                   ignore_eos=cfg.ignore_eos, lossless=LosslessConfig())
        events = asyncio.get_running_loop()
        try:  # tokenizing is done; binding a compressor may calibrate it once: off the event loop
            handle = await asyncio.to_thread(loop.submit, segments, cfg, comp, events_to=events, tenant=who)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}", kind="rate_limit_error",
                           headers={"Retry-After": str(settings.retry_after)}) from exc
        except EngineClosed as exc:
            raise ApiError(503, str(exc), kind="server_error") from exc
        except SlimKVError as exc:
            raise ApiError(400, str(exc)) from exc
        return handle, described

    async def pieces(handle: RequestHandle, request: Request, watch: bool = True) -> AsyncIterator[str]:
        """The request's text pieces; cancels it when the client leaves or its time runs out.

        watch: poll the connection for a disconnect (a streamed response is cancelled by its event
        stream instead, which owns the connection's messages)
        """
        deadline = time.monotonic() + settings.timeout
        stream = handle.__aiter__()
        last = time.perf_counter()
        try:
            while True:
                next_piece = asyncio.ensure_future(stream.__anext__())
                while not next_piece.done():
                    await asyncio.wait({next_piece}, timeout=0.25)
                    if next_piece.done():
                        break
                    if watch and await request.is_disconnected():
                        raise asyncio.CancelledError("the client disconnected")
                    if time.monotonic() > deadline:
                        raise ApiError(408, f"the request ran past its {settings.timeout:.0f} s limit and was "
                                            "cancelled", kind="timeout_error")
                try:
                    piece = next_piece.result()
                except StopAsyncIteration:
                    return
                now = time.perf_counter()
                metrics.itl.observe(now - last)
                last = now
                yield piece
        except BaseException:
            handle.cancel()
            if "next_piece" in locals() and not next_piece.done():
                next_piece.cancel()
            raise

    def usage(result: GenerationResult) -> Usage:
        cached = result.store.hit_tokens if result.store is not None else 0
        return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids),
                     total_tokens=result.prompt_tokens + len(result.token_ids),
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def kv(result: GenerationResult, described: str) -> KVReport:
        c = result.cache
        return KVReport(method=described, tokens_full=c.tokens_full, tokens_kept=c.tokens_kept,
                        bytes_full=c.bytes_full, bytes_kept=c.bytes_kept)

    def account(result: GenerationResult) -> None:
        metrics.prompt_tokens.inc(result.prompt_tokens)
        metrics.generated_tokens.inc(len(result.token_ids))
        metrics.ttft.observe(result.timing.ttft_s)
        metrics.bytes_saved.inc(max(0, result.cache.bytes_full - result.cache.bytes_kept))
        if result.store is not None:
            metrics.store_hits.inc(result.store.hit_tokens)

    # ------------------------------------------------------------------ routes
    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        ids = await asyncio.to_thread(engine.tokenizer.encode, body.text())
        handle, described = await submit(request, body, Segments(ids, []), body.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None = None, result: GenerationResult | None = None,
                  choices: bool = True) -> dict:
            return Completion(id=rid, created=created, model=settings.model_name,
                              choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else [],
                              usage=usage(result) if result is not None else None,
                              kv=kv(result, described) if result is not None else None).model_dump()

        if not body.stream:
            text = await collect(pieces(handle, request))
            result = finished(handle)
            return chunk(text, FINISH.get(result.finish_reason, "stop"), result)

        async def events() -> AsyncIterator[str]:
            async for piece in pieces(handle, request, watch=False):
                yield json_of(chunk(piece))
            result = finished(handle)
            yield json_of(chunk("", FINISH.get(result.finish_reason, "stop")))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield json_of(chunk("", result=result, choices=False))
            yield "[DONE]"

        return EventSourceResponse(guarded(events()), sep="\n")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (roles in order, ...)
            raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from exc
        ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)
        handle, described = await submit(request, body, Segments(ids, []), body.limit())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: Delta, finish: str | None = None, result: GenerationResult | None = None,
                  choices: bool = True) -> dict:
            return ChatCompletionChunk(id=rid, created=created, model=settings.model_name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish)] if choices else [],
                                       usage=usage(result) if result is not None else None,
                                       kv=kv(result, described) if result is not None else None).model_dump()

        if not body.stream:
            text = await collect(pieces(handle, request))
            result = finished(handle)
            return ChatCompletion(id=rid, created=created, model=settings.model_name,
                                  choices=[ChatChoice(message=AssistantMessage(content=text),
                                                      finish_reason=FINISH.get(result.finish_reason, "stop"))],
                                  usage=usage(result), kv=kv(result, described)).model_dump()

        async def events() -> AsyncIterator[str]:
            yield json_of(chunk(Delta(role="assistant", content="")))
            async for piece in pieces(handle, request, watch=False):
                yield json_of(chunk(Delta(content=piece)))
            result = finished(handle)
            yield json_of(chunk(Delta(), FINISH.get(result.finish_reason, "stop")))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield json_of(chunk(Delta(), result=result, choices=False))
            yield "[DONE]"

        return EventSourceResponse(guarded(events()), sep="\n")

    def finished(handle: RequestHandle) -> GenerationResult:
        result = handle.result
        assert result is not None
        account(result)
        return result

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        tenant(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "slimkv", "max_model_len": engine.adapter.max_positions}]}

    @app.get("/health")
    async def health() -> dict:
        if loop.failure is not None:
            raise ApiError(503, f"the engine loop failed: {loop.failure}", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def json_of(data: dict) -> str:
    return json.dumps(data, separators=(",", ":"))


async def collect(stream: AsyncIterator[str]) -> str:
    """The whole text of a non-streamed request (an engine error becomes a 4xx answer)."""
    try:
        return "".join([p async for p in stream])
    except SlimKVError as exc:
        raise ApiError(400, str(exc)) from exc


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that ends with an error event (then ``[DONE]``) instead of a dropped connection."""
    try:
        async for event in events:
            yield event
    except ApiError as exc:
        yield json_of({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}})
        yield "[DONE]"
    except SlimKVError as exc:
        yield json_of({"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}})
        yield "[DONE]"
