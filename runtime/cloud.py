"""``CloudModel``: an OpenAI-compatible endpoint (vLLM, TGI, llama.cpp, a hosted API, another
``edgec serve``) with the same ``chat()``/``generate()`` results as a local ``LLM`` (install the
``server`` extra for httpx).

    cloud = CloudModel("https://api.example.com/v1", "some-model", api_key_env="EXAMPLE_API_KEY")
    cloud.chat([{"role": "user", "content": "Hi"}], max_tokens=32).text

Failure handling, which the routing in ``edgec.runtime.hybrid`` builds on:

- Timeouts: ``connect_timeout`` per connection, ``read_timeout`` per read, ``total_timeout`` per call
  (retries and waits included). A read never waits longer than what was left of the total when the
  attempt started, and the total is checked after every read, so a call ends by at most twice its
  total (a server that sends nothing), usually by it (one that drips bytes).
- Retries only where they are safe: before any output was handed out, on connection failures,
  timeouts, 429 and 5xx, with exponential backoff; a 429's ``Retry-After`` is honoured when it fits
  in the time left, otherwise the call fails at once so the caller can fall back. 400/401/403/404 are
  never retried: they fail the same way again.
- A circuit breaker: after ``breaker_failures`` failed calls in a row the endpoint counts as down for
  ``breaker_cooldown`` seconds (``available()`` is False), then one call may try again.
- Garbage is an error: a body that is not JSON, JSON without a text answer, a malformed server-sent
  event or a stream that ends without its end marker raise ``CloudError(code="malformed")``.
- ``cancel`` (a ``threading.Event``) ends a stream at the next event, as for a local ``LLM``.

The API key is read from the environment variable ``api_key_env`` when a call is made; it is never
stored in a file, a log line or the object's repr.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any, Iterator

from edgec.errors import InputError, RuntimeFailure
from edgec.runtime.llm import Chunk, Completion, Timings, Usage
from edgec.runtime.sampling import SamplingParams

#: Status codes worth another try: the same request may well succeed a moment later.
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
#: Largest answer body, and longest server-sent event line, read from a cloud.
MAX_BODY_BYTES = 16 << 20
_STATUS_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "rate_limited"}


class CloudError(RuntimeFailure):
    """A cloud call failed. ``code``: unauthorized, forbidden, not_found, rate_limited, server_error,
    bad_request, timeout, connection, malformed, circuit_open or cancelled; ``status`` is the HTTP
    status when there was one; ``partial`` is True when some output had been handed out already."""

    def __init__(self, message: str, code: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.retry_after = code, status, retry_after
        self.partial = False

    @property
    def retryable(self) -> bool:
        return self.code in ("timeout", "connection") or (self.status or 0) in RETRYABLE_STATUS


class CircuitBreaker:
    """Opens after ``failures`` failed calls in a row; half-opens after ``cooldown`` seconds."""

    def __init__(self, failures: int = 3, cooldown: float = 30.0, clock=time.monotonic) -> None:
        self.failures, self.cooldown, self.clock = failures, cooldown, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._lock = threading.Lock()

    def available(self) -> bool:
        with self._lock:
            return self.opened_at is None or self.clock() - self.opened_at >= self.cooldown

    def record(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.consecutive, self.opened_at = 0, None
                return
            self.consecutive += 1
            if self.consecutive >= self.failures:
                self.opened_at = self.clock()  # a failed half-open try starts a new cool-down


class CloudModel:
    """An OpenAI-compatible ``/v1`` endpoint; see the module docstring for timeouts, retries and errors.

    ``context_length``: the cloud model's context, for routing prompts too long for the device
    (``None``: unknown, assumed large enough). ``continuation``: how a partial answer is handed over
    mid-stream: ``"prefix"`` sends it as a final assistant message with ``continue_final_message``
    (vLLM's and ``edgec serve``'s extension: the model continues the same message), ``"instruction"``
    adds a user turn asking to continue (for APIs without the extension).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, connect_timeout: float = 3.0,
                 read_timeout: float = 30.0, total_timeout: float = 60.0, retries: int = 2, backoff: float = 0.25,
                 breaker_failures: int = 3, breaker_cooldown: float = 30.0, context_length: int | None = None,
                 continuation: str = "prefix", transport: Any = None) -> None:
        import httpx

        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InputError(f"cloud base_url {base_url!r} must be an http:// or https:// URL (e.g. https://host/v1)")
        if continuation not in ("prefix", "instruction"):
            raise InputError(f"cloud continuation={continuation!r}: choose 'prefix' or 'instruction'")
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout),
                            ("total_timeout", total_timeout)):
            if not value > 0:
                raise InputError(f"cloud {name}={value!r} must be > 0 seconds")
        if retries < 0:
            raise InputError(f"cloud retries={retries} must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key_env = model, api_key_env
        self.connect_timeout, self.read_timeout, self.total_timeout = connect_timeout, read_timeout, total_timeout
        self.retries, self.backoff = retries, backoff
        self.context_length, self.continuation = context_length, continuation
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown)
        self.name = f"{model}@{self.base_url}"
        self._client = httpx.Client(transport=transport, follow_redirects=False)

    def __repr__(self) -> str:
        return f"CloudModel({self.base_url!r}, {self.model!r}, api_key_env={self.api_key_env!r})"

    def close(self) -> None:
        self._client.close()

    def available(self) -> bool:
        """False while the circuit breaker is open."""
        return self.breaker.available()

    # --- the model surface ------------------------------------------------------------------------------

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, stream: bool = False,
             cancel: threading.Event | None = None, timeout: float | None = None, prefix: str = "",
             **overrides: Any) -> Completion | Iterator[Chunk]:
        """The assistant's answer to ``messages``; with ``prefix``, the continuation of an answer that
        starts with it (see ``continuation``). ``timeout`` lowers ``total_timeout`` for this call."""
        body = {"messages": self._handover(messages, prefix)}
        if prefix and self.continuation == "prefix":
            body.update(continue_final_message=True, add_generation_prompt=False)
        return self._call("/chat/completions", body, params, overrides, stream, cancel, timeout, chat=True)

    def generate(self, prompt: str, params: SamplingParams | None = None, *, stream: bool = False,
                 cancel: threading.Event | None = None, timeout: float | None = None,
                 **overrides: Any) -> Completion | Iterator[Chunk]:
        """The continuation of ``prompt`` (``/v1/completions``)."""
        if not isinstance(prompt, str):
            raise InputError("a cloud model continues text prompts only, not token ids")
        return self._call("/completions", {"prompt": prompt}, params, overrides, stream, cancel, timeout, chat=False)

    def _handover(self, messages: list[dict], prefix: str) -> list[dict]:
        messages = [{"role": m["role"], "content": m.get("content")} for m in messages]
        if not prefix:
            return messages
        if self.continuation == "prefix":
            return messages + [{"role": "assistant", "content": prefix}]
        return messages + [{"role": "assistant", "content": prefix},
                           {"role": "user", "content": "Continue your answer exactly where it stops, without "
                                                       "repeating any of it."}]

    # --- HTTP ---------------------------------------------------------------------------------------------

    def _call(self, path: str, body: dict, params: SamplingParams | None, overrides: dict, stream: bool,
              cancel: threading.Event | None, timeout: float | None, chat: bool) -> Completion | Iterator[Chunk]:
        params = (params or SamplingParams()).with_overrides(**overrides).validate()
        body = {"model": self.model, **body, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "stream": stream}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        if stream:
            body["stream_options"] = {"include_usage": True}
        total = min(timeout, self.total_timeout) if timeout is not None else self.total_timeout
        call = _Call(self, path, body, chat, time.monotonic() + total, cancel)
        if not self.breaker.available():
            raise CloudError(f"{self.name}: the endpoint failed {self.breaker.consecutive} times in a row; "
                             f"not trying again for {self.breaker.cooldown:g} s", "circuit_open")
        return call.stream() if stream else call.complete()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise CloudError(f"{self.name}: the environment variable {self.api_key_env} (the API key) is not set",
                                 "unauthorized")
            headers["Authorization"] = f"Bearer {key}"
        return headers


class _Call:
    """One call with its deadline: attempts, waits between them, and the parsing of the answer."""

    def __init__(self, cloud: CloudModel, path: str, body: dict, chat: bool, deadline: float,
                 cancel: threading.Event | None) -> None:
        self.cloud, self.path, self.body, self.chat, self.deadline = cloud, path, body, chat, deadline
        self.cancel = cancel
        self.start = time.perf_counter()

    def _timeout(self):
        import httpx

        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CloudError(f"{self.cloud.name}: no answer within the call's time limit", "timeout")
        return httpx.Timeout(connect=min(self.cloud.connect_timeout, left), read=min(self.cloud.read_timeout, left),
                             write=min(self.cloud.read_timeout, left), pool=min(self.cloud.connect_timeout, left))

    def _wait_before_retry(self, error: CloudError, attempt: int) -> bool:
        """Sleep before the next attempt; False when there is no time for it (or it was cancelled)."""
        if not error.retryable or attempt >= self.cloud.retries:
            return False
        wait = error.retry_after if error.retry_after is not None else self.cloud.backoff * 2**attempt * (
            1 + random.random() / 2)
        if time.monotonic() + wait >= self.deadline:
            return False
        if self.cancel is not None:
            return not self.cancel.wait(wait)
        time.sleep(wait)
        return True

    def _run(self, attempt_once):
        """``attempt_once()`` with retries; the breaker hears how the whole call went."""
        attempt = 0
        while True:
            try:
                return attempt_once()
            except CloudError as error:
                if not self._wait_before_retry(error, attempt):
                    self.cloud.breaker.record(False)
                    raise
                attempt += 1

    def _request_error(self, exc: Exception) -> CloudError:
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            return CloudError(f"{self.cloud.name}: timed out ({type(exc).__name__})", "timeout")
        return CloudError(f"{self.cloud.name}: connection failed ({type(exc).__name__}: {exc})", "connection")

    def _status_error(self, response) -> CloudError:
        status = response.status_code
        try:
            detail = json.loads(self._body(response))["error"]["message"]
        except Exception:  # any body: HTML from a proxy, nothing, JSON of another shape, too slow
            detail = response.reason_phrase
        retry_after = None
        if status == 429:
            try:
                retry_after = max(0.0, float(response.headers.get("retry-after", "")))
            except ValueError:
                retry_after = None
        code = _STATUS_CODES.get(status) or ("server_error" if status >= 500 else "bad_request")
        hint = {401: "; check the API key", 403: "; check the API key's permissions",
                404: "; check base_url and the model name"}.get(status, "")
        return CloudError(f"{self.cloud.name}: HTTP {status} {detail}{hint}", code, status, retry_after)

    # --- one JSON answer ----------------------------------------------------------------------------------

    def complete(self) -> Completion:
        import httpx

        def once() -> Completion:
            try:
                with self.cloud._client.stream("POST", self.cloud.base_url + self.path, json=self.body,
                                               headers=self.cloud._headers(), timeout=self._timeout()) as response:
                    if response.status_code != 200:
                        raise self._status_error(response)
                    return self._parse(self._body(response))
            except httpx.HTTPError as exc:
                raise self._request_error(exc) from None

        result = self._run(once)
        self.cloud.breaker.record(True)
        return result

    def _reads(self, response) -> Iterator[bytes]:
        """The body as it arrives, checked against the deadline after every read: a server that drips
        bytes slower than the total but faster than the read timeout cannot hold the call."""
        for data in response.iter_bytes():
            if time.monotonic() > self.deadline:
                raise CloudError(f"{self.cloud.name}: the answer did not arrive within the call's time limit",
                                 "timeout")
            yield data

    def _body(self, response) -> bytes:
        body = bytearray()
        for data in self._reads(response):
            body += data
            if len(body) > MAX_BODY_BYTES:
                raise CloudError(f"{self.cloud.name}: the answer is larger than {MAX_BODY_BYTES} bytes", "malformed")
        return bytes(body)

    def _lines(self, response) -> Iterator[str]:
        buffer = b""
        for data in self._reads(response):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8")
            if len(buffer) > MAX_BODY_BYTES:
                raise CloudError(f"{self.cloud.name}: a server-sent event line is longer than {MAX_BODY_BYTES} bytes",
                                 "malformed")
        if buffer:
            yield buffer.decode("utf-8")

    def _parse(self, content: bytes) -> Completion:
        try:
            data = json.loads(content)
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
            if not isinstance(text, str):
                raise TypeError("the answer's text is not a string")
            usage = data.get("usage") or {}
            prompt_tokens, completion_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise CloudError(f"{self.cloud.name}: the answer is not an OpenAI {'chat ' if self.chat else ''}"
                             f"completion ({type(exc).__name__}: {str(exc)[:80]})", "malformed") from None
        seconds = time.perf_counter() - self.start
        return Completion(text, [], prompt_tokens, completion_tokens, _finish(choice.get("finish_reason")),
                          Timings(time_to_first_token=seconds, total_seconds=seconds))

    # --- server-sent events -----------------------------------------------------------------------------

    def stream(self) -> Iterator[Chunk]:
        """Chunks as they arrive; the last has finish_reason, usage and timings. Retries happen only
        before the first chunk; an error after it has ``partial=True``."""
        started = [False]

        def once() -> Iterator[Chunk]:
            try:
                yield from self._events()
            except CloudError as error:
                error.partial = started[0]
                raise

        # The first chunk decides whether the call works: retries happen while nothing was handed out.
        def first() -> tuple[Chunk, Iterator[Chunk]]:
            events = once()
            try:
                return next(events), events
            except StopIteration:
                raise CloudError(f"{self.cloud.name}: the stream ended without an answer", "malformed") from None

        chunk, events = self._run(first)
        started[0] = True
        try:
            yield chunk
            while chunk.finish_reason is None:
                chunk = next(events)
                yield chunk
        except CloudError:
            self.cloud.breaker.record(False)
            raise
        except StopIteration:
            self.cloud.breaker.record(False)
            raise CloudError(f"{self.cloud.name}: the stream ended without a finish", "malformed") from None
        finally:
            events.close()
        self.cloud.breaker.record(True)

    def _events(self) -> Iterator[Chunk]:
        import httpx

        timings = Timings()
        usage = Usage(0, 0)
        finish = None
        try:
            with self.cloud._client.stream("POST", self.cloud.base_url + self.path, json=self.body,
                                           headers=self.cloud._headers(), timeout=self._timeout()) as response:
                if response.status_code != 200:
                    raise self._status_error(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise CloudError(f"{self.cloud.name}: asked for a stream, got "
                                     f"{response.headers.get('content-type') or 'no content type'}", "malformed")
                for line in self._lines(response):
                    if self.cancel is not None and self.cancel.is_set():
                        yield self._final(timings, usage, "cancelled")
                        return
                    if time.monotonic() > self.deadline:
                        raise CloudError(f"{self.cloud.name}: the stream did not finish within the call's time limit",
                                         "timeout")
                    if not line or line.startswith(":"):  # keep-alive and comments
                        continue
                    field, _, value = line.partition(":")
                    if field != "data":
                        if field in ("event", "id", "retry"):
                            continue
                        raise CloudError(f"{self.cloud.name}: malformed server-sent event {line[:60]!r}", "malformed")
                    value = value.strip()
                    if value == "[DONE]":
                        if finish is None:
                            raise CloudError(f"{self.cloud.name}: the stream ended without a finish reason", "malformed")
                        yield self._final(timings, usage, finish)
                        return
                    text, finish_now, usage_now = self._event(value)
                    if usage_now is not None:
                        usage = usage_now
                    finish = finish_now or finish
                    if text:
                        if timings.time_to_first_token == 0.0:
                            timings.time_to_first_token = time.perf_counter() - self.start
                        yield Chunk(text, None)
        except httpx.HTTPError as exc:
            raise self._request_error(exc) from None
        except UnicodeDecodeError:
            raise CloudError(f"{self.cloud.name}: the stream is not UTF-8 text", "malformed") from None
        raise CloudError(f"{self.cloud.name}: the stream ended without its [DONE] marker", "malformed")

    def _event(self, value: str) -> tuple[str, str | None, Usage | None]:
        try:
            data = json.loads(value)
            if "error" in data:
                message = data["error"].get("message") if isinstance(data["error"], dict) else data["error"]
                raise CloudError(f"{self.cloud.name}: error in the stream: {message}", "server_error")
            usage = data.get("usage")
            usage = Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])) if usage else None
            choices = data["choices"]
            if not choices:
                return "", None, usage
            choice = choices[0]
            text = (choice["delta"].get("content") if self.chat else choice["text"]) or ""
            if not isinstance(text, str):
                raise TypeError("the text is not a string")
            return text, choice.get("finish_reason"), usage
        except CloudError:
            raise
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise CloudError(f"{self.cloud.name}: malformed stream event ({type(exc).__name__}: {value[:60]!r})",
                             "malformed") from None

    def _final(self, timings: Timings, usage: Usage, finish: str) -> Chunk:
        timings.total_seconds = time.perf_counter() - self.start
        return Chunk("", None, _finish(finish), usage, timings)


def _finish(reason: Any) -> str:
    return reason if reason in ("stop", "length", "cancelled") else "stop"
