"""The OpenAI-compatible server, with the official ``openai`` client against a real uvicorn on 127.0.0.1.

Plumbing (auth, body limits, error objects, failures inside the model) runs on a tiny fake LLM; what
the issue asks for (answers, streaming, usage, concurrency, back-pressure, cancellation, shutdown) runs
on SmolLM2-135M-Instruct imported with its int4 GGUF weights.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from edgec.errors import InputError  # noqa: E402
from edgec.runtime.sampling import SamplingParams  # noqa: E402
from edgec.runtime.server import create_app, uvicorn_server  # noqa: E402

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"  # greedy SmolLM2 keeps counting: a long generation


class Server:
    """``create_app(...)`` served by uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, models: dict, **options) -> None:
        self.app = create_app(models, **options)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(self.app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.clients: list[openai.OpenAI] = []

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """What Ctrl-C does (once: a second one forces uvicorn out)."""
        if not self.server.should_exit:
            self.server.handle_exit(signal.SIGINT, None)
        self.thread.join(15)
        for client in self.clients:
            client.close()
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def client(self, **options) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", "none"), max_retries=0,
                               timeout=60, **options)
        self.clients.append(client)
        return client

    def admitted(self, model: str) -> int:
        return self.app.state.api.queues[model].admitted


def wait_for(condition, seconds: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- plumbing, on a fake model ------------------------------------------------------------------------


@dataclass
class _Done:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class _Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Chunk:
    text: str
    token_id: int | None
    finish_reason: str | None = None
    usage: _Usage | None = None


class FakeLLM:
    """The ``LLM`` surface the server uses: one token per character; the answer is ``reply``, a letter at a time.

    ``fail``: raise this exception type from the generation (after ``fail_after`` tokens when streaming).
    """

    context_length = 64

    def __init__(self, reply: str = "hello", fail: type[Exception] | None = None, fail_after: int = 0) -> None:
        self.reply, self.fail, self.fail_after = reply, fail, fail_after

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def apply_chat_template(self, messages: list[dict]) -> str:
        if any(not isinstance(m["content"], str) for m in messages):
            raise InputError("content must be a string")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def generate(self, prompt, params: SamplingParams | None = None, *, stream=False, cancel=None):
        params = (params or SamplingParams()).validate()
        prompt_tokens = len(prompt) if isinstance(prompt, list) else self.count_tokens(prompt)
        text = self.reply[: params.max_tokens]
        reason = "length" if len(text) < len(self.reply) else "stop"

        def chunks():
            for i, c in enumerate(text):
                if self.fail is not None and i == self.fail_after:
                    raise self.fail("secret detail")
                last = i == len(text) - 1
                yield _Chunk(c, ord(c), reason if last else None, _Usage(prompt_tokens, len(text)) if last else None)

        if stream:
            return chunks()
        if self.fail is not None:
            raise self.fail("secret detail")
        return _Done(text, prompt_tokens, len(text), reason)


@pytest.fixture(scope="module")
def fake():
    models = {"fake": FakeLLM(), "broken": FakeLLM(fail=RuntimeError),
              "breaks-midway": FakeLLM(fail=RuntimeError, fail_after=2)}
    with Server(models, max_request_bytes=4096, api_key="sesame", max_tokens_limit=32) as server:
        yield server


def test_fake_answers_with_openai_shapes(fake):
    client = fake.client(api_key="sesame")
    assert [m.id for m in client.models.list().data] == ["fake", "broken", "breaks-midway"]
    assert client.models.retrieve("fake").id == "fake"
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                          extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                                                      "unknown_field": 1})
    assert chat.object == "chat.completion" and chat.choices[0].message.content == "hello"
    assert chat.choices[0].finish_reason == "stop" and chat.model == "fake"
    assert chat.usage.prompt_tokens == len("<user>hi<assistant>") and chat.usage.completion_tokens == 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 5
    text = client.completions.create(model="fake", prompt="abc")
    assert text.object == "text_completion" and text.choices[0].text == "hello" and text.usage.prompt_tokens == 3
    assert client.completions.create(model="fake", prompt=[97, 98], max_tokens=2).choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5


def test_auth_limits_and_error_objects(fake):
    url = fake.url
    auth = {"Authorization": "Bearer sesame"}
    with pytest.raises(openai.AuthenticationError):
        fake.client(api_key="wrong").models.list()
    assert error_of(httpx.get(f"{url}/v1/models"))["code"] == "invalid_api_key"

    def post(path="/v1/chat/completions", **kwargs):
        return httpx.post(f"{url}{path}", headers={**auth, **kwargs.pop("headers", {})}, timeout=30, **kwargs)

    r = post(content=b'{"model": "fake", "messages": [')
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = post(json=["not", "an", "object"])
    assert r.status_code == 400
    r = post(json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = post(json={"model": "fake", "messages": [{"role": "user", "content": 5}]})
    assert r.status_code == 400
    r = post(json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 33})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = post(json={"model": "fake", "messages": [{"role": "user", "content": "x" * 100}]})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = post("/v1/completions", json={"model": "fake", "prompt": ["a", "b"]})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    # too large, announced by Content-Length, and sent chunked without one
    r = post(json={"model": "fake", "prompt": "x" * 5000})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = post(content=iter([b'{"model": "fake", "prompt": "', b"x" * 5000, b'"}']))
    assert r.status_code == 413
    assert error_of(post("/v1/nowhere", json={}))["code"] == "unknown_url"
    assert post("/v1/models").status_code == 405
    # a failure inside the model: logged, a generic 500, nothing of the exception leaks
    r = post(json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and "secret" not in r.text and error_of(r)["type"] == "server_error"
    r = post(json={"model": "broken", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert r.status_code == 500
    # ... and once the stream has started: an error event, which the openai client raises
    with pytest.raises(openai.APIError):
        list(fake.client(api_key="sesame").chat.completions.create(
            model="breaks-midway", messages=[{"role": "user", "content": "hi"}], stream=True))
    # still serving, and nothing left in any queue
    assert fake.client(api_key="sesame").completions.create(model="fake", prompt="a").choices[0].text == "hello"
    wait_for(lambda: all(q.admitted == 0 for q in fake.app.state.api.queues.values()), what="the queues to empty")


# --- the real model --------------------------------------------------------------------------------


class Spy:
    """The real ``LLM``, recording how each generation ended: ("stop" | "length" | "cancelled" | "closed", tokens)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.ended: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def generate(self, prompt, params=None, *, stream=False, cancel=None, **overrides):
        result = self.llm.generate(prompt, params, stream=stream, cancel=cancel, **overrides)
        if not stream:
            self.ended.append((result.finish_reason, result.completion_tokens))
            return result
        return self._watch(result)

    def _watch(self, chunks):
        count, reason = 0, "closed"
        try:
            for chunk in chunks:
                count += chunk.token_id is not None
                if chunk.finish_reason is not None:
                    reason = chunk.finish_reason
                yield chunk
        finally:
            chunks.close()
            self.ended.append((reason, count))


@pytest.fixture(scope="module")
def smollm2(smollm2_dirs):
    from edgec.runtime.llm import LLM

    llm = LLM.from_dir(smollm2_dirs["gguf-int4"], context_length=1024)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def served(smollm2):
    spy = Spy(smollm2)
    with Server({"smollm2": spy}) as server:
        server.spy = spy
        yield server


@pytest.mark.slow
def test_chat_answers_paris_streaming_and_not(served, smollm2):
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    answer = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=48)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.choices[0].finish_reason == "stop"
    direct = smollm2.chat(FRANCE, max_tokens=48)
    assert text == direct.text
    prompt_ids = smollm2.encode(smollm2.apply_chat_template(FRANCE), add_special_tokens=False)
    assert answer.usage.prompt_tokens == len(prompt_ids) == direct.prompt_tokens
    assert answer.usage.completion_tokens == direct.completion_tokens == len(direct.tokens)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=48,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.model_dump() == answer.usage.model_dump()


@pytest.mark.slow
def test_completions_and_usage(served, smollm2):
    client = served.client()
    done = client.completions.create(model="smollm2", prompt=COUNTING, max_tokens=12, temperature=0, seed=3,
                                     stop=["never"], extra_body={"top_k": 40, "repetition_penalty": 1.0})
    assert done.choices[0].text.startswith(" 5, 6, 7") and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == smollm2.count_tokens(COUNTING)
    assert done.usage.completion_tokens == 12 == len(smollm2.encode(done.choices[0].text, add_special_tokens=False))
    pieces = list(client.completions.create(model="smollm2", prompt=COUNTING, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == done.choices[0].text
    assert pieces[-1].usage.model_dump() == done.usage.model_dump()
    stopped = client.completions.create(model="smollm2", prompt=COUNTING, max_tokens=30, temperature=0, stop=" 8,")
    assert stopped.choices[0].text == " 5, 6, 7," and stopped.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_concurrent_requests_all_complete(served):
    client = served.client()

    def ask(i: int) -> str:
        return client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=24,
                                              seed=i).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert len(answers) == 4 and all("Paris" in a for a in answers) and len(set(answers)) == 1


@pytest.mark.slow
def test_bad_requests_get_error_objects_and_the_server_keeps_serving(served):
    client = served.client()
    r = httpx.post(f"{served.url}/v1/chat/completions", content=b"{'model': 'smollm2'", timeout=30)
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    with pytest.raises(openai.BadRequestError) as n2:
        client.chat.completions.create(model="smollm2", messages=FRANCE, n=2)
    assert n2.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as cold:
        client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=-1)
    assert cold.value.body["param"] == "temperature" and "temperature" in cold.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as big:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x" * (1 << 20)}])
    assert big.value.status_code == 413
    long = " ".join(["word"] * 1500)
    with pytest.raises(openai.BadRequestError) as beyond:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": long}])
    assert beyond.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as beyond:
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=5000)
    assert beyond.value.body["code"] == "context_length_exceeded" and beyond.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt=[1, 2, 10**9])  # token id beyond the vocabulary
    answer = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=24)
    assert "Paris" in answer.choices[0].message.content
    assert served.admitted("smollm2") == 0


@pytest.mark.slow
def test_full_queue_is_429_and_a_disconnect_cancels(smollm2):
    spy = Spy(smollm2)
    with Server({"smollm2": spy}, max_queue=1) as server:
        client = server.client()
        long = client.completions.create(model="smollm2", prompt=COUNTING, max_tokens=1000, temperature=0, stream=True)
        pieces = iter(long)
        assert next(pieces).choices[0].text is not None  # generating: the model is busy
        # a client that gives up while waiting leaves the queue
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", timeout=0.5, json={"model": "smollm2", "prompt": "Hi"})
        wait_for(lambda: server.admitted("smollm2") == 1, what="the abandoned request to leave the queue")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model="smollm2", prompt="The sea is", max_tokens=4,
                                  temperature=0)
            wait_for(lambda: server.admitted("smollm2") == 2, what="the second request to queue")
            with pytest.raises(openai.RateLimitError) as full:
                client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4)
            assert full.value.body["code"] == "queue_full"
            assert full.value.response.headers["retry-after"] == "1"
            for _ in range(3):
                next(pieces)
            long.close()  # the client goes away mid-stream
            wait_for(lambda: len(spy.ended) >= 1, what="the long generation to stop")
            reason, tokens = spy.ended[0]
            assert reason in ("cancelled", "closed") and tokens < 1000
            assert waiting.result(timeout=30).usage.completion_tokens == 4  # the queue moved on
        wait_for(lambda: server.admitted("smollm2") == 0, what="the queue to empty")
        # a client that leaves a non-streaming request while it generates cancels it too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", timeout=1.0,
                       json={"model": "smollm2", "prompt": COUNTING, "max_tokens": 1000, "temperature": 0})
        wait_for(lambda: len(spy.ended) >= 3, what="the abandoned generation to stop")
        assert spy.ended[2][0] == "cancelled" and spy.ended[2][1] < 1000
        assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.slow
def test_stopping_the_server_stops_generating(smollm2):
    spy = Spy(smollm2)
    with Server({"smollm2": spy}) as server:
        client = server.client()
        pieces = iter(client.completions.create(model="smollm2", prompt=COUNTING, max_tokens=1000, temperature=0,
                                                stream=True))
        next(pieces)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model="smollm2", prompt="Hi", max_tokens=4)
            wait_for(lambda: server.admitted("smollm2") == 2, what="the second request to queue")
            stopping = threading.Thread(target=server.stop)
            stopping.start()
            with pytest.raises(openai.APIError) as ended:
                for _ in pieces:
                    pass
            assert ended.value.code == "server_shutting_down"
            with pytest.raises(openai.InternalServerError) as refused:
                waiting.result(timeout=30)
            assert refused.value.status_code == 503 and refused.value.code == "server_shutting_down"
            stopping.join(20)
        assert len(spy.ended) == 1 and spy.ended[0][0] == "cancelled" and spy.ended[0][1] < 1000
