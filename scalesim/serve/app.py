"""The HTTP surface: an OpenAI-compatible FastAPI app over one :class:`EngineLoop`.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain, or server-sent
events with ``stream: true``; ``stream_options.include_usage`` adds a last usage chunk),
``POST /v1/embeddings`` (pooled hidden states of the served model, see
:mod:`runtime.embedding`; labelled so in ``/v1/models``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text), the bulk hints ``POST /v1/scalesim/hints`` and the seed
paper's ``POST /v1/update``. Every request gets an access-log line (:mod:`~scalesim.serve.access`).

Bodies are read and validated here, so that every client error is a 400 in the OpenAI format
naming its field (FastAPI would answer 422 in its own format). A handler resolves the model
field and the agent identity (:mod:`~scalesim.serve.identity`), renders the messages
(:mod:`~scalesim.serve.prompt`), applies the request's hints, submits a
:class:`~scalesim.serve.loop.Job` and waits for its events; the engine loop tokenizes it on a
worker thread, never on the event loop or the engine's thread. A client that disconnects while
waiting cancels its request.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import time
import uuid
from urllib.parse import quote
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

import numpy as np

from runtime import Completion, Request, SamplingParams
from scalesim.serve.access import AccessLog
from scalesim.serve.errors import APIError, bad_request, from_validation
from scalesim.serve.identity import AGENT_HEADER, AdapterRegistry, resolve_identity
from scalesim.serve.loop import EmbeddingJob, EngineLoop, Job
from scalesim.serve.prompt import parse_tool_calls, render, tool_names
from scalesim.serve.protocol import (ChatCompletionBody, CompletionBody, EmbeddingBody,
                                     GenerationBody, HintsBody, ScaleSimFields, UpdateBody,
                                     server_constraint)

Body = TypeVar("Body", bound=BaseModel)
#: How often a waiting handler checks whether its client is still there (seconds).
DISCONNECT_POLL_S = 0.2


@dataclass
class ServeState:
    """What the app serves: the engine loop, the model names, and its settings."""

    loop: EngineLoop
    registry: AdapterRegistry
    api_key: str | None = None
    #: called once when the app shuts down, after the loop drained (writes the trace)
    on_shutdown: Callable[[], None] | None = None
    drain_timeout_s: float = 60.0
    created: int = field(default_factory=lambda: int(time.time()))
    #: ``serve.tool_choice_auto``: "required" makes a call of tools offered with "auto" forced
    tool_choice_auto: str = "auto"
    #: ``serve.default_temperature``: a request's temperature when it sets none
    default_temperature: float = 0.0
    #: ``serve.choice_prompts``, compiled
    choice_prompts: tuple[re.Pattern[str], ...] = ()


#: the metrics label of each endpoint path: the same one the served requests of it count under
ENDPOINTS = {"chat/completions": "chat", "completions": "completions", "scalesim/hints": "hints",
             "update": "update", "models": "models", "embeddings": "embeddings"}

#: what ``/v1/models`` says of the embeddings a model card's ``embeddings`` field describes
EMBEDDINGS_NOTE = ("pooled hidden states of a chat model, not a trained embedding model: the "
                   "mean over the input's tokens of the last hidden state (after the final "
                   "norm), L2-normalised; no chat template, no adapter")


def _endpoint(path: str) -> str:
    for name, label in ENDPOINTS.items():
        if path.startswith(f"/v1/{name}"):
            return label
    return path.strip("/") or "root"


#: the largest request body read (a 413 beyond it)
MAX_BODY_BYTES = 16 * 2**20


async def _json_body(request: HTTPRequest) -> Any:
    """The request's JSON: a 413 when it is too large, a 400 when it is not JSON or nested
    deeper than the parser goes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {int(declared)} bytes, more than the server's "
                       f"limit of {MAX_BODY_BYTES}", code="request_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {len(raw)} bytes, more than the server's "
                       f"limit of {MAX_BODY_BYTES}", code="request_too_large")
    try:
        return json.loads(raw) if raw else None
    except RecursionError:
        raise bad_request(None, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:
        raise bad_request(None, f"malformed JSON body: {exc}") from None


async def _parse(request: HTTPRequest, model: type[Body]) -> Body:
    data = await _json_body(request)
    if not isinstance(data, dict):
        raise bad_request(None, "the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except (ValidationError, RecursionError) as exc:
        if isinstance(exc, RecursionError):
            raise bad_request(None, "the request body is nested too deeply") from None
        raise from_validation(exc.errors()) from None
    unsupported = body.unsupported() if isinstance(body, GenerationBody) else None
    if unsupported is not None:
        raise bad_request(*unsupported)
    return body


def _usage(c: Completion) -> dict[str, Any]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.output_tokens,
            "total_tokens": c.prompt_tokens + c.output_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}


def _headers(job: Job) -> dict[str, str]:
    """Response headers that say whom the server took the request for."""
    return {"x-scalesim-agent": quote(job.info["agent"], safe=""),
            "x-scalesim-identity": job.info["identity_source"],
            "x-request-id": str(job.request.request_id)}


def create_app(state: ServeState) -> FastAPI:
    """The FastAPI app of ``state`` (see the module docstring)."""
    loop, registry = state.loop, state.registry

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and let open requests finish; drain what is left.
        if state.on_shutdown is not None:
            await asyncio.to_thread(state.on_shutdown)
        else:
            await asyncio.to_thread(loop.drain, state.drain_timeout_s)
            loop.stop()

    async def authorize(request: HTTPRequest) -> None:
        if state.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    app = FastAPI(title="scalesim.serve", lifespan=lifespan, dependencies=[Depends(authorize)])
    app.add_middleware(AccessLog)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        if exc.status != 429 and not exc.recorded:  # 429s and the loop's own are counted
            loop.refused(_endpoint(request.url.path), exc)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods too get OpenAI's error format (clients parse it).
        what = (f"no endpoint {request.method} {request.url.path} (this server has "
                "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, "
                "/v1/scalesim/hints, /v1/update, /health, /metrics)") if exc.status_code in (404, 405) \
            else str(exc.detail)
        error = APIError(exc.status_code, what,
                         code="not_found" if exc.status_code == 404 else None)
        loop.refused(_endpoint(request.url.path), error)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        error = from_validation(list(exc.errors()))
        loop.refused(_endpoint(request.url.path), error)
        return error.response()

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if loop.healthy else "failed", "pending": loop.pending,
                "error": loop.error}
        return JSONResponse(body, status_code=200 if loop.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        # The engine belongs to its thread: its report is taken there, between iterations.
        report = await asyncio.wrap_future(loop.call(loop.engine.report)) if loop.healthy \
            else {}
        text = loop.metrics.render(report.get("memory"), loop.distance)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    architecture = loop.engine.architecture()

    def _model_card(model_id: str) -> dict[str, Any]:
        adapter = registry.resolve(model_id).adapter_name
        embeddings: dict[str, Any] = {"available": loop.engine.embeddings and adapter is None,
                                      "kind": "pooled_hidden_states", "pooling": "mean",
                                      "normalized": True, "note": EMBEDDINGS_NOTE}
        if architecture is not None:
            embeddings["dimensions"] = architecture.hidden_size
        if adapter is not None:
            embeddings["why_not"] = "embeddings come from the base model, not an adapter"
        elif not loop.engine.embeddings:
            embeddings["why_not"] = ("this server's executor computes no hidden states; "
                                     "embeddings need the torch executor on one engine")
        return {"id": model_id, "object": "model", "created": state.created,
                "owned_by": "scalesim", "embeddings": embeddings}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in registry.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        registry.resolve(model_id)
        return _model_card(model_id)

    def _apply_hints(agent: str, fields: ScaleSimFields | None) -> None:
        distance = loop.distance
        if fields is None or distance is None:
            return
        if fields.next_eta is None and not fields.hints:
            return

        def apply() -> None:
            if fields.next_eta is not None:
                distance.hint(agent, fields.next_eta, fields.clock, fields.kind)
            for item in fields.hints:
                distance.hint(item.agent, item.eta, fields.clock, fields.kind)
        loop.call(apply)  # best-effort: nothing waits on it, nothing fails because of it

    def _job(request: HTTPRequest, body: ChatCompletionBody | CompletionBody, endpoint: str,
             prefix: str, prompt: str, stream: bool,
             history: tuple[dict[str, Any], ...] = ()) -> Job:
        choice = registry.resolve(body.model)
        fields = body.scalesim
        identity = resolve_identity(
            request.headers.get(AGENT_HEADER), fields.agent if fields else None,
            body.prompt_cache_key, body.user, choice,
            body.messages if isinstance(body, ChatCompletionBody) else None)
        try:
            temperature = (state.default_temperature if body.temperature is None
                           else body.temperature)
            sampling = SamplingParams(max_tokens=1, temperature=temperature,
                                      top_p=body.top_p if body.top_p is not None else 1.0,
                                      top_k=max(body.top_k or 0, 0),
                                      seed=body.seed, stop=body.stops())
        except Exception as exc:
            raise bad_request(None, str(exc)) from None
        constraint, constrained_by = None, None
        asked = body.constraint()
        if asked is None and loop.engine.structured_output:  # modeled: placeholder text
            asked = server_constraint(body, state.tool_choice_auto, state.choice_prompts)
        if asked is not None:
            constrained_by, constraint = asked
            if not loop.engine.structured_output:
                raise bad_request(constrained_by, f"{constrained_by}: this server's executor produces no real "
                                  "tokens (modeled); constrained replies need the torch or hf "
                                  "executor")
        _apply_hints(identity.agent, fields)
        info = {"agent": identity.agent, "identity_source": identity.source,
                "endpoint": endpoint, "model": body.model, "adapter": choice.adapter_name,
                "session": fields.session if fields else None,
                "session_clock": fields.clock if fields else None,
                # the field that constrained the reply (requests.parquet), None when free
                "constraint": constrained_by}
        return Job(Request(identity.agent, prompt, prefix, sampling, choice.adapter_path,
                           history=history, constraint=constraint),
                   endpoint, asyncio.Queue(), asyncio.get_running_loop(),
                   body.requested_tokens(), stream, info)

    async def _next_event(job: Job | EmbeddingJob, request: HTTPRequest) -> tuple[str, Any]:
        get = asyncio.ensure_future(job.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
                if done:
                    return get.result()
                if await request.is_disconnected():
                    loop.cancel(job)
                    raise APIError(499, "the client disconnected", type="client_closed")
        finally:
            get.cancel()

    async def _final(job: Job, request: HTTPRequest) -> Completion:
        while True:
            kind, value = await _next_event(job, request)
            if kind == "done":
                return value
            if kind == "error":
                raise value

    def _chat_message(body: ChatCompletionBody, text: str) -> tuple[dict[str, Any], str | None]:
        if not body.tools or body.tool_choice == "none":
            return {"role": "assistant", "content": text}, None
        content, calls = parse_tool_calls(text, tool_names(body.tools))
        if not calls:
            return {"role": "assistant", "content": text}, None
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"

    async def _stream(job: Job, request: HTTPRequest, chunk: Callable[..., dict[str, Any]],
                      finish: Callable[[Completion], list[dict[str, Any]]],
                      include_usage: bool) -> AsyncIterator[str]:
        try:
            yield f"data: {json.dumps(chunk(first=True))}\n\n"
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield f"data: {json.dumps(chunk(text=value))}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    break
                else:
                    for item in finish(value):
                        yield f"data: {json.dumps(item)}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps(chunk(usage=_usage(value)))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            loop.cancel(job)  # a no-op once it finished; frees its memory if the client left

    def _submit(job: Job) -> None:
        loop.submit(job)  # 429 / 503 raise from here

    async def _accepted(job: Job, request: HTTPRequest) -> None:
        """Wait until the engine took ``job``, so that a stream starts only once it can run
        (a prompt too long for the context is a 400, not an error inside a 200 stream)."""
        kind, value = await _next_event(job, request)
        if kind == "error":
            raise value

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest) -> Any:
        body = await _parse(request, ChatCompletionBody)
        prefix, history, prompt = render(body.messages, body.tools)
        job = _job(request, body, "chat", prefix, prompt, body.stream and not body.tools, history)
        _submit(job)
        rid = f"chatcmpl-{job.request.request_id}-{uuid.uuid4().hex[:8]}"
        created = int(time.time())

        def chunk(text: str | None = None, first: bool = False, usage: Any = None,
                  finish: str | None = None, delta: dict[str, Any] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk",
                                   "created": created, "model": body.model}
            if usage is not None:
                out["choices"], out["usage"] = [], usage
                return out
            if delta is None:
                delta = {"role": "assistant", "content": ""} if first else {"content": text}
            out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish,
                               "logprobs": None}]
            return out

        if body.stream:
            def finish(c: Completion) -> list[dict[str, Any]]:
                if body.tools:  # buffered: the reply is either content or tool calls
                    message, reason = _chat_message(body, c.text)
                    delta = {k: v for k, v in message.items() if k != "role"}
                    for i, call in enumerate(delta.get("tool_calls", ())):
                        call["index"] = i
                    return [chunk(delta=delta),
                            chunk(delta={}, finish=reason or c.finish_reason)]
                return [chunk(delta={}, finish=c.finish_reason)]

            include = bool(body.stream_options and body.stream_options.include_usage)
            await _accepted(job, request)
            return StreamingResponse(_stream(job, request, chunk, finish, include),
                                     media_type="text/event-stream", headers=_headers(job))
        c = await _final(job, request)
        message, reason = _chat_message(body, c.text)
        return JSONResponse(
            {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
             "choices": [{"index": 0, "message": message, "logprobs": None,
                          "finish_reason": reason or c.finish_reason}],
             "usage": _usage(c), "system_fingerprint": "scalesim"}, headers=_headers(job))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        body = await _parse(request, CompletionBody)
        job = _job(request, body, "completions", "", body.prompt_text(), body.stream)
        _submit(job)
        rid = f"cmpl-{job.request.request_id}-{uuid.uuid4().hex[:8]}"
        created = int(time.time())

        def chunk(text: str | None = None, first: bool = False, usage: Any = None,
                  finish: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                                   "model": body.model}
            if usage is not None:
                out["choices"], out["usage"] = [], usage
                return out
            out["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish,
                               "logprobs": None}]
            return out

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            await _accepted(job, request)
            return StreamingResponse(
                _stream(job, request, chunk, lambda c: [chunk(finish=c.finish_reason)], include),
                media_type="text/event-stream", headers=_headers(job))
        c = await _final(job, request)
        return JSONResponse(
            {"id": rid, "object": "text_completion", "created": created, "model": body.model,
             "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                          "logprobs": None}], "usage": _usage(c)}, headers=_headers(job))

    @app.post("/v1/embeddings")
    async def embeddings(request: HTTPRequest) -> Any:
        body = await _parse(request, EmbeddingBody)
        choice = registry.resolve(body.model)
        if body.dimensions is not None:
            raise bad_request("dimensions", "dimensions: shortened embeddings are not offered; "
                              "an embedding has the model's hidden size")
        if choice.adapter_name is not None:
            raise bad_request("model", f"model: {body.model!r} is an adapter; embeddings come "
                              "from the base model")
        if not loop.engine.embeddings:
            raise bad_request("model", "model: this server's executor computes no hidden "
                              "states (modeled, or engine replicas); embeddings need the torch "
                              "executor on one engine")
        inputs = body.inputs()
        identity = resolve_identity(request.headers.get(AGENT_HEADER), None, None, body.user,
                                    choice)
        info = {"agent": identity.agent, "identity_source": identity.source,
                "endpoint": "embeddings", "model": body.model, "adapter": None}
        job = EmbeddingJob(inputs, asyncio.Queue(), asyncio.get_running_loop(), info)
        loop.embed(job)
        kind, value = await _next_event(job, request)
        if kind == "error":
            raise value
        vectors, tokens = value
        data = [{"object": "embedding", "index": i,
                 "embedding": vector if body.encoding_format == "float" else
                 base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")}
                for i, vector in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                            headers={"x-scalesim-agent": quote(identity.agent, safe=""),
                                     "x-scalesim-identity": identity.source,
                                     "x-request-id": str(job.request_id)})

    @app.post("/v1/scalesim/hints")
    async def hints(request: HTTPRequest) -> dict[str, Any]:
        body = await _parse(request, HintsBody)
        distance = loop.distance
        if distance is None:
            return {"applied": False, "reason": "this server's policy reads no distances"}
        applied = await asyncio.wrap_future(loop.call(
            lambda: distance.bulk(body.session, body.clock, body.seq, body.hints)))
        return {"applied": applied, "session": body.session, "seq": body.seq,
                **({} if applied else {"reason": "stale seq"})}

    @app.post("/v1/update")
    async def update(request: HTTPRequest) -> dict[str, Any]:
        data = await _json_body(request)
        if isinstance(data, dict) and "distances" not in data:
            data = {"distances": data}  # a bare {agent: distance} mapping
        try:
            body = UpdateBody.model_validate(data)
        except ValidationError as exc:
            raise from_validation(exc.errors()) from None
        distance = loop.distance
        if distance is None:
            return {"applied": 0}

        def apply() -> int:
            for agent, d in body.distances.items():
                distance.hint(agent, float(d), 0.0)
            return len(body.distances)
        return {"applied": await asyncio.wrap_future(loop.call(apply))}

    return app
