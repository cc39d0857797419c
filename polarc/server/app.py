"""The OpenAI-compatible HTTP API over the engine loop (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent
events in OpenAI's chunk format, ``[DONE]`` last, when ``stream`` is true), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Errors have OpenAI's body, ``{"error":
{"message", "type", "param", "code"}}``: 400 for a bad request (one line saying what), 401
without the API key, 404 for an unknown model, 503 when the queue is full or the server is
shutting down. A client that goes away mid-request has its request cancelled: its slot and
pages free at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from polarc.runtime.scheduler import Event, RequestError
from polarc.runtime.scheduler import Request as Job
from polarc.server.engine_loop import Draining, EngineLoop, QueueFull

MAX_STOP = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (status, message, kind,
                                                                       param, code)


def _error(status: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


class Sampling(BaseModel):
    """The fields both endpoints share (unknown fields are ignored, as OpenAI's server does;
    those polarc cannot honour are refused when set)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    model: str
    max_tokens: int | None = Field(default=None, strict=True)
    max_completion_tokens: int | None = Field(default=None, strict=True)
    temperature: float = Field(default=1.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, strict=True)
    n: int = Field(default=1, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v < 0:
            raise ValueError("temperature must be >= 0")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("top_p must be in (0, 1]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP} non-empty strings")
        return stops


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, strict=True)
    echo: bool = False
    ignore_eos: bool = Field(default=False, strict=True)  # polarc's (and vLLM's) extension

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            return v  # token ids
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt must be one string or one list of token ids")
            v = v[0]
        if not v:
            raise ValueError("prompt is empty")
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatBody(Sampling):
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("messages is empty")
        return v


def _first_error(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """One line for the first thing wrong with a body, and the field it is about."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if err.get("type") == "missing":
        return f"{param} is required", param
    return (f"{param}: {msg}" if param else msg), param


class Server:
    """The app's state: the engine loop, the model's name, the tokenizer, the API key."""

    def __init__(self, loop: EngineLoop, *, model_name: str, api_key: str | None) -> None:
        self.loop = loop
        self.model_name = model_name
        self.api_key = api_key
        self.tokenizer = loop.scheduler.tokenizer
        self.max_seq = loop.scheduler.runtime.max_seq

    def job(self, body: Sampling, prompt: list[int]) -> Job:
        if body.model != self.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, "n must be 1 (one completion per request)", param="n")
        if body.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs is not supported", param="logprobs")
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence and frequency penalties are not supported",
                           param="presence_penalty")
        if getattr(body, "echo", False):
            raise ApiError(400, "echo is not supported", param="echo")
        most = body.max_completion_tokens if body.max_completion_tokens is not None else \
            body.max_tokens
        if most is None:
            most = self.max_seq - len(prompt)
        if most < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {most}", param="max_tokens")
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        return Job(prompt=prompt, max_tokens=most, temperature=body.temperature,
                   top_p=body.top_p, seed=seed, stop=tuple(body.stop or ()),
                   ignore_eos=getattr(body, "ignore_eos", False))


class ApiKeyCheck:
    """401 for a /v1/ request without `Authorization: Bearer KEY`. Plain ASGI: Starlette's
    BaseHTTPMiddleware (`@app.middleware`) relays every streamed chunk through a memory stream
    of its own and made each disconnect check cost a task group, a hot path here."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error(401, "a valid API key is required (Authorization: Bearer "
                                  "KEY)", "authentication_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def make_app(server: Server) -> FastAPI:
    app = FastAPI(title="polarc", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _first_error(exc)
        return _error(400, msg, param=param)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    if server.api_key is not None:
        app.add_middleware(ApiKeyCheck, key=server.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.loop.error is not None:
            return JSONResponse({"status": "error", "error": str(server.loop.error)}, 503)
        return JSONResponse({"status": "draining" if server.loop._draining else "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(server.loop.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": 0, "owned_by": "polarc",
             "max_model_len": server.max_seq,
             "vocab_size": server.loop.scheduler.runtime.spec.vocab}]})

    async def _body(request: Request, schema: type[Sampling]) -> Sampling:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            msg, param = _first_error(exc)
            raise ApiError(400, msg, param=param) from None

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        body = await _body(request, CompletionBody)
        if isinstance(body.prompt, list):
            prompt = body.prompt
            vocab = server.loop.scheduler.runtime.spec.vocab
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            prompt = server.tokenizer.encode(body.prompt)
        return await _run(request, server.job(body, prompt), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # noqa: ANN202
        body = await _body(request, ChatBody)
        if not server.tokenizer.chat_template:
            raise ApiError(400, "this engine's tokenizer has no chat template; use "
                                "/v1/completions", param="messages")
        try:
            prompt = server.tokenizer.chat([m.model_dump() for m in body.messages])
        except Exception as exc:  # a template that rejects these messages
            raise ApiError(400, f"the chat template cannot render these messages: {exc}",
                           param="messages") from None
        return await _run(request, server.job(body, prompt), body, chat=True)

    async def _run(request: Request, job: Job, body: Sampling, *, chat: bool):  # noqa: ANN202
        try:
            stream = server.loop.submit(job)
        except RequestError as exc:
            raise ApiError(400, str(exc), param="messages" if chat else "prompt") from None
        except QueueFull as exc:
            return _error(503, str(exc), "server_error", code="queue_full",
                          headers={"Retry-After": "1"})
        except Draining as exc:
            return _error(503, str(exc), "server_error", code="shutting_down")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(request, stream, rid, created, chat, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, last = "", None
        async for batch in _events(request, stream, watch=True):
            text += "".join(ev.text for ev in batch)
            last = batch[-1]
        if last is None:  # the client went away
            return _error(499, "the client closed the request", "server_error")
        if last.finish_reason == "error":
            return _error(400 if "failed" not in (last.error or "") else 500,
                          last.error or "the request failed", "server_error"
                          if "failed" in (last.error or "") else "invalid_request_error")
        out = last.output_text if last.output_text is not None else text
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": len(last.tokens or []),
                 "total_tokens": len(job.prompt) + len(last.tokens or [])}
        finish = "stop" if last.finish_reason == "stop" else "length"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out},
                      "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created,
                             "model": server.model_name, "choices": [choice], "usage": usage})

    async def _events(request: Request, stream: Any, *, watch: bool
                      ) -> AsyncIterator[list[Event]]:
        """The request's events, in batches of what has arrived, until its last; cancels the
        request if the client goes away. `watch`: wait for the disconnect here (a whole
        response); a streamed one hears of it from StreamingResponse, which cancels this
        generator."""
        queue, done = stream.events, False
        gone = asyncio.ensure_future(_client_gone(request)) if watch else None
        try:
            while True:
                batch = []
                if queue.empty():
                    if gone is None:
                        batch.append(await queue.get())
                    else:
                        getter = asyncio.ensure_future(queue.get())
                        await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                        if not getter.done():
                            getter.cancel()
                            return
                        batch.append(getter.result())
                while not queue.empty():
                    batch.append(queue.get_nowait())
                yield batch
                if batch[-1].finish_reason is not None:
                    done = True
                    return
        finally:
            if gone is not None:
                gone.cancel()
            if not done:
                server.loop.cancel(stream.request)

    async def _sse(request: Request, stream: Any, rid: str, created: int, chat: bool,
                   usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                          "model": server.model_name, "choices": [choice]}) \
                + "\n\n"

        if chat:
            yield chunk(None, None, first=True)
        # A chunk per token, as OpenAI's API and vLLM stream (its text may be empty: a token
        # that ends inside a character, or one a stop string holds back); the chunks that
        # arrived together go out in one write.
        async for batch in _events(request, stream, watch=False):
            out = []
            for ev in batch:
                if ev.finish_reason == "error":
                    out.append("data: " + json.dumps({"error": {"message": ev.error,
                                                                "type": "server_error"}}) + "\n\n")
                    break
                if ev.finish_reason is None:
                    out.append(chunk(ev.text, None))
                    continue
                out.append(chunk(ev.text or None, "stop" if ev.finish_reason == "stop"
                                 else "length"))
                if usage:
                    n = len(ev.tokens or [])
                    out.append("data: " + json.dumps({
                        "id": rid, "object": obj, "created": created,
                        "model": server.model_name, "choices": [],
                        "usage": {"prompt_tokens": len(stream.request.prompt),
                                  "completion_tokens": n,
                                  "total_tokens": len(stream.request.prompt) + n}}) + "\n\n")
            yield "".join(out)
        yield "data: [DONE]\n\n"

    return app
