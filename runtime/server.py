"""An OpenAI-compatible HTTP server over local ``LLM``s (install the ``server`` extra).

    GET  /v1/models               the served models
    GET  /v1/models/{id}
    POST /v1/chat/completions     messages → assistant message; ``stream: true`` for server-sent events
    POST /v1/completions          prompt → continuation; likewise

One request, in order:

    auth (401)  →  read the body, at most ``max_request_bytes`` (413)  →  parse and check the fields,
    tokenize, check the context (400)  →  unknown model (404)  →  join the model's queue: one request
    generates, at most ``max_queue`` wait, any more get 429 at once  →  wait for the turn in the event
    loop (a waiting request holds no thread)  →  generate in a worker thread  →  one JSON answer, or
    SSE chunks handed over through a bounded queue (the worker waits when the client reads slowly)

A client that disconnects while waiting leaves the queue; one that disconnects while its answer is
generated sets the generation's ``cancel`` event, so the model is free again within a token or so.
Errors are OpenAI error objects, ``{"error": {"message", "type", "param", "code"}}``; an unexpected
failure is logged with its traceback and answered with a generic 500. Nothing a request sends stops
the server from answering the next one.

Differences from OpenAI's API: one choice per request (``n`` must be 1), no logprobs, no tools.
``top_k``, ``min_p`` and ``repetition_penalty`` are accepted as extensions. Fields the server does not
know are ignored, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgec.errors import InputError
from edgec.runtime.cloud import CloudError
from edgec.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from edgec.runtime.llm import LLM

log = logging.getLogger("edgec.server")

#: Completions (the legacy endpoint) default to 16 new tokens, as OpenAI's do; chat to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: Chunks a streaming generation may run ahead of a slow client before the worker waits.
STREAM_BUFFER = 64
#: A streaming client that reads nothing for this long loses its generation, so it cannot hold the model.
STREAM_STALL_SECONDS = 60.0
#: An oversized body is read and dropped up to this many bytes, so the client sees the 413 instead of a
#: reset connection; beyond it the connection is closed unread.
_DRAIN_LIMIT = 16 << 20


class APIError(Exception):
    """An error answered as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def create_app(models: dict[str, LLM], *, max_queue: int = 8, max_request_bytes: int = 1 << 20,
               max_tokens_limit: int | None = None, api_key: str | None = None) -> Starlette:
    """The ASGI app serving ``models`` (name → ``LLM``; the name is what clients send as ``model``).

    ``max_queue``: requests that may wait for a model while it generates; one more gets 429.
    ``max_request_bytes``: largest request body (413 beyond). ``max_tokens_limit``: largest
    ``max_tokens`` a request may ask for, and the cap on the default. ``api_key``: when set, requests
    must send ``Authorization: Bearer <api_key>`` (401 otherwise).
    """
    if not models:
        raise InputError("create_app needs at least one model to serve")
    if max_queue < 0:
        raise InputError(f"max_queue={max_queue} must be >= 0")
    if max_request_bytes < 1:
        raise InputError(f"max_request_bytes={max_request_bytes} must be >= 1")
    if max_tokens_limit is not None and max_tokens_limit < 1:
        raise InputError(f"max_tokens_limit={max_tokens_limit} must be >= 1")
    api = _API(dict(models), max_queue, max_request_bytes, max_tokens_limit, api_key)
    routes = [
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=api.lifespan)
    app.state.api = api
    return app


def serve(models: dict[str, LLM], *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
          **options: Any) -> None:
    """Serve ``models`` with uvicorn until interrupted (Ctrl-C, SIGTERM); ``options`` go to ``create_app``."""
    app = create_app(models, **options)
    if host not in ("127.0.0.1", "localhost", "::1") and not options.get("api_key"):
        log.warning("serving on %s without an API key: anyone who can reach this address can use the models", host)
    # Open connections bound the memory held by request bodies being read (max_request_bytes each); one
    # more gets uvicorn's 503.
    connections = 4 * len(models) * (options.get("max_queue", 8) + 1) + 16
    uvicorn_server(app, host=host, port=port, log_level=log_level, limit_concurrency=connections).run()


def uvicorn_server(app: Starlette, **config: Any):
    """A ``uvicorn.Server`` for ``app`` (``config`` goes to ``uvicorn.Config``) whose shutdown does not wait
    for generations: asked to stop, it first answers waiting requests 503 and cancels what is generating."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = getattr(app.state, "loop", None)
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(app.state.api.close)  # in the loop: this may run in a signal handler
            super().handle_exit(sig, frame)

    config.setdefault("timeout_graceful_shutdown", 5)  # then uvicorn cancels whatever still runs
    return Server(uvicorn.Config(app, **config))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths and wrong methods, as error objects too."""
    if exc.status_code == 404:
        return APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="unknown_url").response()
    if exc.status_code == 405:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed",
                        headers=exc.headers).response()
    return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()


# --- the endpoints -----------------------------------------------------------------------------------


@dataclass
class _Call:
    """A checked request, ready to generate."""

    model: str
    llm: LLM
    chat: bool
    prompt: str | list[int]  #: what ``llm.generate`` gets
    prompt_tokens: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None  #: chat requests, for a routed model (``HybridLLM``)
    routing: dict | None = None  #: a routed model's request options: local_only, deadline_s, features


class _API:
    def __init__(self, models: dict[str, LLM], max_queue: int, max_request_bytes: int,
                 max_tokens_limit: int | None, api_key: str | None) -> None:
        self.models = models
        self.queues = {name: _ModelQueue(name, max_queue) for name in models}
        self.max_request_bytes = max_request_bytes
        self.max_tokens_limit = max_tokens_limit
        self.api_key = api_key
        self.created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()  # for uvicorn_server's shutdown
        yield
        self.close()

    def close(self) -> None:
        """Stop generating: new and waiting requests get 503, generations in flight are cancelled."""
        for queue in self.queues.values():
            queue.close()

    # Each endpoint answers every failure itself, so one bad request never reaches the server's loop.

    async def list_models(self, request: Request) -> Response:
        return await self._guard(request, self._list_models)

    async def get_model(self, request: Request) -> Response:
        return await self._guard(request, self._get_model)

    async def chat_completions(self, request: Request) -> Response:
        return await self._guard(request, lambda r: self._complete(r, chat=True))

    async def completions(self, request: Request) -> Response:
        return await self._guard(request, lambda r: self._complete(r, chat=False))

    async def _guard(self, request: Request, handler: Callable[[Request], Any]) -> Response:
        try:
            self._authorize(request)
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except InputError as exc:  # from the LLM: a chat template that refuses the messages, bad token ids, ...
            return APIError(400, str(exc)).response()
        except ClientDisconnect:
            return _gone()
        except CloudError as exc:  # a routed model's cloud failed where the device could not answer instead
            return APIError(502, str(exc), type="server_error", code=f"cloud_{exc.code}").response()
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.url.path)
            return _internal_error().response()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "edgec",
                "context_length": self.models[name].context_length}

    async def _list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(name) for name in self.models]})

    async def _get_model(self, request: Request) -> Response:
        return JSONResponse(self._model_card(self._llm(request.path_params["model"])[0]))

    def _llm(self, name: Any) -> tuple[str, LLM]:
        if name not in self.models:
            raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(map(repr, self.models))}",
                           param="model", code="model_not_found")
        return name, self.models[name]

    async def _complete(self, request: Request, chat: bool) -> Response:
        body = await _read_json(request, self.max_request_bytes)
        # Tokenizing a long prompt takes a while: off the event loop.
        call = await asyncio.to_thread(self._parse, body, chat)
        job = _Job(call)
        disconnected = asyncio.ensure_future(_disconnect(request))
        streaming = False
        try:
            # 429 at once when the queue is full; a client that leaves while waiting leaves the queue
            if not await self.queues[call.model].start(job, disconnected):
                return _gone()
            item = await _first(job.next(), disconnected)
            if item is None:
                return _gone()
            kind, value = item
            if kind == "error":
                raise value
            if not call.stream:
                if value.finish_reason == "cancelled":  # the client is still here: the server is stopping
                    raise _shutting_down()
                return JSONResponse(_completion_body(call, job.id, job.created, value))
            streaming = True
            return _EventStream(job, _events(call, job, item), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finally:
            disconnected.cancel()  # a streaming response listens for the disconnect itself
            if not streaming:
                job.cancel.set()  # stops the generation if it still runs: the client left or the server stops

    def _parse(self, body: Any, chat: bool) -> _Call:
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, not {_json_type(body)}")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required: a string naming one of the models at /v1/models", param="model")
        model, llm = self._llm(model)

        n = _get(body, "n", int)
        if n is not None and n != 1:
            raise APIError(400, f"n={n}: this server generates one choice per request; send n=1 or leave it out",
                           param="n")
        if not chat and (_get(body, "best_of", int) or 1) != 1:
            raise APIError(400, "best_of must be 1: this server generates one choice per request", param="best_of")
        if body.get("logprobs") or body.get("top_logprobs"):
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        if not chat and body.get("echo"):
            raise APIError(400, "echo is not supported by this server", param="echo")
        stream = bool(_get(body, "stream", bool))
        options = _get(body, "stream_options", dict) or {}
        include_usage = bool(_get(options, "include_usage", bool, "stream_options.include_usage"))

        messages = None
        if chat:
            prompt, prompt_tokens, messages = _chat_prompt(llm, body.get("messages"),
                                                           bool(_get(body, "continue_final_message", bool)))
        else:
            prompt, prompt_tokens = _text_prompt(llm, body.get("prompt"))

        max_tokens, max_name = _get(body, "max_completion_tokens", int), "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_name = _get(body, "max_tokens", int), "max_tokens"
        if max_tokens is not None and self.max_tokens_limit is not None and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"{max_name}={max_tokens} is above this server's limit of {self.max_tokens_limit}",
                           param=max_name)
        room = llm.context_length - prompt_tokens
        if room < 1:
            raise APIError(400, f"this model's context length is {llm.context_length} tokens; the "
                           f"{'messages' if chat else 'prompt'} have {prompt_tokens}: shorten them",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
            if self.max_tokens_limit is not None:
                max_tokens = min(max_tokens, self.max_tokens_limit)
        elif max_tokens >= 1 and max_tokens > room:
            raise APIError(400, f"this model's context length is {llm.context_length} tokens; you asked for "
                           f"{prompt_tokens + max_tokens} ({prompt_tokens} in the {'messages' if chat else 'prompt'}, "
                           f"{max_tokens} for the completion): shorten the prompt or lower {max_name}",
                           param=max_name, code="context_length_exceeded")

        stop = body.get("stop")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_default(_get(body, "temperature", float), 1.0),  # OpenAI's default
            top_p=_default(_get(body, "top_p", float), 1.0),
            top_k=_default(_get(body, "top_k", int), 0),
            min_p=_default(_get(body, "min_p", float), 0.0),
            repetition_penalty=_default(_get(body, "repetition_penalty", float), 1.0),
            seed=_get(body, "seed", int),
            stop=[] if stop is None else [stop] if isinstance(stop, str) else stop,
        )
        _validate(params, max_name)
        routing = None
        if getattr(llm, "takes_messages", False):  # extensions a routed model understands
            deadline = _get(body, "deadline_s", float)
            if deadline is not None and deadline <= 0:
                raise APIError(400, f"deadline_s={deadline} must be > 0 seconds", param="deadline_s")
            routing = {"local_only": bool(_get(body, "local_only", bool)), "deadline_s": deadline,
                       "features": ("tools",) if body.get("tools") else ()}
        return _Call(model, llm, chat, prompt, prompt_tokens, params, stream, include_usage, messages, routing)


def _internal_error() -> APIError:
    return APIError(500, "internal server error; the server log has the details", type="server_error",
                    code="internal_error")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="server_shutting_down")


def _gone() -> Response:
    """The answer to a client that has gone: nobody reads it (499 is nginx's "client closed request")."""
    return Response(status_code=499)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", dict: "an object", str: "a string"}


def _get(body: dict, name: str, kind: type, param: str | None = None) -> Any:
    """``body[name]`` checked to be ``kind`` (null or absent: None). JSON has no int/bool confusion, Python does."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise APIError(400, f"{param or name} must be {_TYPE_NAMES[kind]}, not {_json_type(value)} ({json.dumps(value)[:40]})",
                       param=param or name)
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _validate(params: SamplingParams, max_name: str) -> None:
    """``params.validate()``, with the first offending field as the error's ``param``."""
    try:
        params.validate()
    except InputError as exc:
        default = SamplingParams()
        bad = next((name for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                      "seed", "stop")
                    if not _valid(replace(default, **{name: getattr(params, name)}))), None)
        raise APIError(400, str(exc), param=max_name if bad == "max_tokens" else bad) from None


def _valid(params: SamplingParams) -> bool:
    try:
        params.validate()
        return True
    except InputError:
        return False


def _chat_prompt(llm: LLM, messages: Any, continue_final: bool = False) -> tuple[list[int], int, list[dict]]:
    """The prompt's token ids, their count and the normalized messages. ``continue_final`` (vLLM's
    ``continue_final_message``): the last message is an assistant message the model continues, so the
    prompt ends with its text instead of a new assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty array of {\"role\", \"content\"} objects",
                       param="messages")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name
        normalized.append({"role": role, "content": message.get("content"),
                           **({"local_only": True} if message.get("local_only") is True else {})})
    if continue_final:
        final = normalized[-1]
        if final["role"] != "assistant" or not isinstance(final["content"], str) or not final["content"]:
            raise APIError(400, "continue_final_message needs a last message from the assistant with text to continue",
                           param="messages")
        text = llm.apply_chat_template(normalized, add_generation_prompt=False)
        # as Hugging Face does: cut the rendered conversation right after the final message's text
        text = text[: text.rindex(final["content"].strip()) + len(final["content"].strip())]
    else:
        text = llm.apply_chat_template(normalized)  # checks the content
    # As LLM.chat does: the template writes BOS itself where the model wants one.
    ids = llm.encode(text, add_special_tokens=False)
    return ids, len(ids), normalized


def _text_prompt(llm: LLM, prompt: Any) -> tuple[str | list[int], int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt, max(llm.count_tokens(prompt), 1)  # an empty prompt starts from BOS
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt, len(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, f"a batch of {len(prompt)} prompts: this server takes one prompt per request",
                       param="prompt")
    raise APIError(400, "'prompt' is required: a string or an array of token ids", param="prompt")


# --- request bodies -----------------------------------------------------------------------------------


async def _read_json(request: Request, limit: int) -> Any:
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"invalid Content-Length {length!r}")
        if int(length) > limit:
            if int(length) <= _DRAIN_LIMIT:
                await _drain(request)
            raise too_large
    body, more = bytearray(), True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:  # sent chunked, without a Content-Length
            body.clear()
            if more:
                await _drain(request)
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


async def _drain(request: Request, limit: int = _DRAIN_LIMIT) -> None:
    """Read and drop the rest of the body (at most ``limit`` bytes), so the client gets to read the answer."""
    seen = 0
    while seen <= limit:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first(work: Any, disconnected: asyncio.Future) -> Any:
    """``await work``, or None if the client disconnects first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([task, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():  # the client left, or this request is being cancelled (the server is stopping)
            task.cancel()
            await asyncio.wait([task])
    return None if task.cancelled() else task.result()


# --- queueing and the worker thread ---------------------------------------------------------------------


class _ModelQueue:
    """One generation at a time per model, at most ``max_waiting`` requests waiting, first come first served."""

    def __init__(self, name: str, max_waiting: int) -> None:
        self.name = name
        self.max_waiting = max_waiting
        self.admitted = 0  #: the generating request plus the waiting ones
        self.running: _Job | None = None
        self.closed = False
        self._lock: asyncio.Lock | None = None  # made in the server's event loop

    def close(self) -> None:
        self.closed = True
        if self.running is not None:
            self.running.cancel.set()

    async def start(self, job: _Job, disconnected: asyncio.Future) -> bool:
        """Wait for the model's turn, then start ``job``; False if the client disconnected first."""
        if self.closed:
            raise _shutting_down()
        if self.admitted > self.max_waiting:
            raise APIError(429, f"the server is busy: {self.name!r} is generating and {self.admitted - 1} "
                           "request(s) are waiting for it; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        if self._lock is None:
            self._lock = asyncio.Lock()
        self.admitted += 1
        try:
            turn = await _first(self._lock.acquire(), disconnected)
        except BaseException:
            self.admitted -= 1
            raise
        if turn is None:
            self.admitted -= 1
            return False
        try:
            if self.closed:
                raise _shutting_down()
            self.running = job
            job.start(on_done=self._done)
        except BaseException:
            self._done()
            raise
        return True

    def _done(self) -> None:
        """The job's worker finished (or never started): the next in line may generate."""
        self.running = None
        self.admitted -= 1
        self._lock.release()


class _Job:
    """One generation in a worker thread; its results reach the event loop through a bounded queue.

    Items are ("chunk", Chunk), ("done", Completion), ("error", exception) and finally ("end", None).
    """

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.id = f"{'chatcmpl' if call.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.cancel = threading.Event()
        self._items: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(STREAM_BUFFER)
        self._loop = asyncio.get_running_loop()
        self._on_done: Callable[[], None] | None = None

    def start(self, on_done: Callable[[], None]) -> None:
        """Run in a worker thread; ``on_done`` is called in the event loop when it has finished."""
        self._on_done = on_done
        threading.Thread(target=self._work, name=f"edgec-{self.id}", daemon=True).start()

    def _work(self) -> None:
        call = self.call
        try:
            if call.routing is not None and call.chat:
                result = call.llm.chat(call.messages, call.params, stream=call.stream, cancel=self.cancel,
                                       **call.routing)
            elif call.routing is not None:
                result = call.llm.generate(call.prompt, call.params, stream=call.stream, cancel=self.cancel,
                                           **call.routing)
            else:
                result = call.llm.generate(call.prompt, call.params, stream=call.stream, cancel=self.cancel)
            if call.stream:
                try:
                    for chunk in result:
                        if not self._put(("chunk", chunk)):
                            break
                finally:
                    result.close()  # releases the model now, not when garbage collected
            else:
                self._put(("done", result))
        except BaseException as exc:  # handed to the request; it decides what the client sees
            self._put(("error", exc), wait=False)
        finally:
            self._send(self._finished)

    def _put(self, item: tuple, wait: bool = True) -> bool:
        """Queue ``item`` once there is room; False if the job was cancelled meanwhile, or the client stalled."""
        deadline = time.monotonic() + STREAM_STALL_SECONDS
        while wait and not self._room.acquire(timeout=0.05):
            if self.cancel.is_set() or time.monotonic() > deadline:
                self.cancel.set()
                return False
        return self._send(self._items.put_nowait, item)

    def _send(self, fn: Callable, *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the loop is closed: the server is gone
            self.cancel.set()
            return False

    def _finished(self) -> None:
        self._items.put_nowait(("end", None))
        if self._on_done is not None:
            self._on_done()

    async def next(self) -> tuple[str, Any]:
        item = await self._items.get()
        if item[0] == "chunk":
            self._room.release()
        return item


class _EventStream(StreamingResponse):
    """The SSE response; however it ends (finished, client gone, server stopping), the generation stops."""

    def __init__(self, job: _Job, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()  # a no-op when the generation has finished


# --- answers ----------------------------------------------------------------------------------------------


def _error_event(error: APIError) -> str:
    """An error after the stream has started: OpenAI's clients raise it."""
    return f"data: {json.dumps(error.body())}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_body(call: _Call, id: str, created: int, completion: Any) -> dict:
    if call.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": completion.text, "refusal": None},
                  "logprobs": None, "finish_reason": completion.finish_reason}
    else:
        choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}
    return {"id": id, "object": "chat.completion" if call.chat else "text_completion", "created": created,
            "model": call.model, "choices": [choice], "system_fingerprint": None,
            "usage": _usage(completion.prompt_tokens, completion.completion_tokens), **_route(completion)}


def _route(result: Any) -> dict:
    """A routed model's answer says which side produced it and why, in an ``edgec`` extension field."""
    if not hasattr(result, "route"):
        return {}
    return {"edgec": {"route": result.route, "reasons": [r.as_dict() for r in result.reasons]}}


async def _events(call: _Call, job: _Job, first: tuple[str, Any]) -> AsyncIterator[str]:
    """SSE lines in OpenAI's chunk format: ``data: {...}`` per piece, usage if asked for, ``data: [DONE]``."""
    base = {"id": job.id, "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": job.created, "model": call.model, "system_fingerprint": None}

    def event(choices: list, usage: dict | None = None, extra: dict | None = None) -> str:
        body = {**base, "choices": choices, **(extra or {})}
        if call.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def choice(text: str | None, finish_reason: str | None) -> dict:
        if call.chat:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    try:
        if call.chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        item = first
        while item[0] != "end":
            kind, value = item
            if kind == "error":
                log.error("generation failed mid-stream", exc_info=value)
                yield _error_event(_internal_error())
                return
            chunk = value
            if chunk.finish_reason is None:
                if chunk.text:
                    yield event([choice(chunk.text, None)])
            else:
                if chunk.text:
                    yield event([choice(chunk.text, None)])
                reason = chunk.finish_reason
                if reason == "cancelled":  # the client left (nobody reads this), or the server is stopping
                    yield _error_event(_shutting_down())
                    return
                yield event([choice(None, reason)], extra=_route(chunk))
                if call.include_usage and chunk.usage is not None:
                    yield event([], _usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
            item = await job.next()
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()
