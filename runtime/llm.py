"""``LLM``: text generation and chat on a decoder (``model.onnx`` + ``tokenizer.json`` + ``generation.json``).

    llm = LLM.from_dir("smollm2/")                       # what ``edgec import`` writes, or a bundle
    llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text
    for chunk in llm.generate("Once upon a time", stream=True, max_tokens=64, temperature=0.7, seed=1):
        print(chunk.text, end="")

One generation: tokenize, check the context, prefill the prompt in chunks, then one token per step
with the key/value cache kept in ONNX Runtime between steps (``edgec.runtime.kv_cache``); each new
token goes through the sampler (``edgec.runtime.sampling``), the incremental detokenizer (whole
characters only) and the stop-string filter before it is returned.

Threads. An ``LLM`` holds one lock: concurrent ``generate``/``chat`` calls from several threads run
one after another, each complete and correct. A streaming call takes the lock when iteration starts
and releases it when the stream ends, is closed, or is garbage collected; so a stream that is
abandoned half-read blocks other calls until it is closed. Do not start a second generation on the
same ``LLM`` while iterating a stream in the same thread: it waits for the first to finish.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np

from edgec.errors import BundleError, InputError
from edgec.runtime import ort as ort_backend
from edgec.runtime.kv_cache import DecoderSession
from edgec.runtime.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from edgec.bundle import Bundle

FinishReason = Literal["stop", "length", "cancelled"]
#: Prompt tokens per prefill run: bounds the attention scores and the logits ([chunk, vocab]) in memory.
PREFILL_CHUNK = 256


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Seconds and rates of one generation (``time.perf_counter`` clock)."""

    prefill_seconds: float = 0.0  #: running the prompt through the model
    prefill_tokens_per_second: float = 0.0
    #: from the call to the first new token: tokenizing, waiting for the model's lock, prefill, sampling
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0  #: from the first new token to the last
    decode_tokens_per_second: float = 0.0  #: tokens after the first / decode_seconds
    total_seconds: float = 0.0


@dataclass
class Completion:
    """The result of a non-streaming call.

    ``tokens`` are every token the model produced, including an end-of-turn token or the token that
    completed a stop string; ``text`` excludes both (and anything after a stop string).
    """

    text: str
    tokens: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    timings: Timings

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)


@dataclass
class Chunk:
    """One piece of a stream: usually one token. ``text`` may be empty while a character is incomplete or
    while text might be the start of a stop string. The last chunk has ``finish_reason``, ``usage`` and
    ``timings``; its ``token_id`` is the token that ended the stream, or ``None`` when cancelled.
    ``probability`` (when the call asked for ``probabilities=True``) is the model's own probability of
    ``token_id`` (softmax of the raw logits, before sampling settings), the uncertainty signal a routing
    policy watches; it costs a softmax over the vocabulary per token, so it is off by default."""

    text: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    probability: float | None = None


@dataclass
class _Request:
    """A checked generation request, ready to run."""

    prompt_ids: list[int]
    params: SamplingParams
    cancel: threading.Event | None
    start: float  #: when the call began (for time to first token)
    probabilities: bool = False  #: give each chunk its token's probability


class LLM:
    """A decoder that generates text. See the module docstring for threads and streams.

    ``model``: path of the ONNX decoder; ``tokenizer``: a ``tokenizers.Tokenizer`` or the path of its
    ``tokenizer.json``; ``generation``: the ``generation.json`` dict (eos ids, chat template, context
    length, bos/eos strings). ``settings`` are ORT session settings (``edgec.runtime.ort``);
    ``artifact_sha256`` with ``cache=True`` enables the device-local optimized-graph cache.
    ``context_length`` may lower the model's (to bound key/value cache memory); never raise it.
    """

    def __init__(self, model: str | os.PathLike, tokenizer: Tokenizer | str | os.PathLike, generation: dict, *,
                 settings: dict | None = None, artifact_sha256: str | None = None, cache: bool = True,
                 context_length: int | None = None, name: str | None = None) -> None:
        from tokenizers import Tokenizer

        self.model_path = Path(model)
        self.artifact_sha256 = artifact_sha256  #: keys this device's measured rates (``edgec bench``)
        self.generation = dict(generation)
        self.name = name or str(self.generation.get("model") or self.model_path.parent.name)
        if isinstance(tokenizer, (str, os.PathLike)):
            try:
                tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as exc:  # tokenizers raises plain Exception on bad files
                raise InputError(f"{tokenizer}: not a tokenizer.json the tokenizers library can read ({exc})") from None
        self.tokenizer: Tokenizer = tokenizer
        self.eos_token_ids = _ids(self.generation.get("eos_token_id"))
        model_context = int(self.generation.get("context_length") or 0)
        if model_context <= 0:
            raise InputError(f"{self.name}: generation config has no context_length")
        if context_length is not None and not 1 < context_length <= model_context:
            raise InputError(f"context_length={context_length} must be in 2..{model_context} (the model's)")
        self._context_length = context_length or model_context
        start = time.perf_counter()
        session = ort_backend.create_session(self.model_path, settings or ort_backend.DEFAULT_SETTINGS,
                                             artifact_sha256=artifact_sha256, cache=cache)
        self.load_seconds = time.perf_counter() - start
        self.decoder = DecoderSession(session, shared_kv=(settings or {}).get("kv_cache") == "shared-buffer")
        vocab = self.decoder.vocab or self.generation.get("vocab_size") or self.tokenizer.get_vocab_size(True)
        self.vocab_size = int(vocab)
        self._template = None
        self._lock = threading.Lock()

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, settings: dict | None = None, threads: int | None = None,
                 cache: bool = True, context_length: int | None = None) -> LLM:
        """An ``LLM`` on a folder with ``model.onnx``, ``tokenizer.json`` and ``generation.json``
        (what ``edgec import`` writes). The optimized-graph cache is keyed by the model file's path,
        size and modification time."""
        import hashlib

        path = Path(path)
        files = [path / "model.onnx", path / "tokenizer.json", path / "generation.json"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{path}: missing {', '.join(missing)}; a decoder folder needs model.onnx, "
                             "tokenizer.json and generation.json (edgec import writes them)")
        settings = dict(settings or ort_backend.DEFAULT_SETTINGS)
        if threads is not None:
            settings["intra_op_num_threads"] = threads
        stat = files[0].stat()
        key = hashlib.sha256(f"{files[0].resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return cls(files[0], files[1], _read_json(files[2]), settings=settings, artifact_sha256=key, cache=cache,
                   context_length=context_length)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, threads: int | None = None, cache: bool = True,
                    context_length: int | None = None) -> LLM:
        """An ``LLM`` on an opened (hash-checked) decoder bundle: its artifact, ``tokenizer.json``,
        ``generation.json`` and the manifest's runtime settings."""
        settings = dict(bundle.manifest.get("runtime", {}))
        backend = settings.pop("backend", "onnxruntime")
        if backend != "onnxruntime":
            raise BundleError(f"{bundle.source}: backend {backend!r} cannot run on this machine")
        if threads is not None:
            settings["intra_op_num_threads"] = threads
        for name in ("tokenizer.json", "generation.json"):
            if not (bundle.path / name).is_file():
                raise BundleError(f"{bundle.source}: no {name}; it is not a decoder bundle")
        artifact = bundle.manifest["artifact"]
        return cls(bundle.artifact, bundle.path / "tokenizer.json", _read_json(bundle.path / "generation.json"),
                   settings=settings, artifact_sha256=bundle.file_sha256(artifact), cache=cache,
                   context_length=context_length, name=bundle.manifest.get("name"))

    # --- small queries ----------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + completion) one generation can hold."""
        return self._context_length

    def count_tokens(self, text: str) -> int:
        """How many tokens ``generate(text)`` would feed as its prompt."""
        return len(self.encode(text))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; control tokens written in the text (``<|im_start|>``) are parsed."""
        if not isinstance(text, str):
            raise InputError(f"the prompt must be a string or a list of token ids, not {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages`` as the model's chat template writes it.

        Rendered like Hugging Face's ``apply_chat_template``: jinja2's immutable sandbox with
        ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` filter,
        ``bos_token``/``eos_token`` and any ``extra`` variables (e.g. ``tools``). Message ``content``
        may be a string or a list of ``{"type": "text", "text": ...}`` parts.
        """
        import jinja2

        template = self._chat_template()
        try:
            return template.render(messages=_normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=self.generation.get("bos_token") or "",
                                   eos_token=(self.generation.get("eos_tokens") or [""])[0] or "", **extra)
        except jinja2.TemplateError as exc:
            raise InputError(f"{self.name}: the chat template refused the messages: {exc}") from None

    def _chat_template(self):
        if self._template is None:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            source = self.generation.get("chat_template")
            if not source:
                raise InputError(f"{self.name}: the model has no chat template; use generate() with a plain prompt")

            def raise_exception(message: str):
                raise jinja2.TemplateError(message)

            def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            try:
                self._template = env.from_string(source)
            except jinja2.TemplateError as exc:
                raise InputError(f"{self.name}: the chat template does not parse: {exc}") from None
        return self._template

    # --- generation -----------------------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, *, stream: bool = False,
                 cancel: threading.Event | None = None, truncate: Literal["error", "left"] = "error",
                 probabilities: bool = False, **overrides: Any) -> Completion | Iterator[Chunk]:
        """Continue ``prompt`` (text, or token ids used as they are).

        Sampling comes from ``params`` (default ``SamplingParams()``: greedy, 256 tokens) with
        ``overrides`` applied, e.g. ``generate(p, max_tokens=32, temperature=0.7, seed=1, stop=["\\n"])``.
        Generation ends at an end-of-turn token (``generation.json``'s ``eos_token_id``) or a stop
        string (finish_reason "stop"), after ``max_tokens`` ("length"), or when ``cancel`` is set or
        the stream is closed ("cancelled").

        Context: prompt tokens + ``max_tokens`` must fit in ``context_length``; otherwise an
        ``InputError``, or with ``truncate="left"`` the oldest prompt tokens are dropped until it fits
        (for a chat prompt that drops the system prompt and the earliest turns first).

        Bad input (invalid sampling values, an over-long prompt) raises ``InputError`` here, before
        any stream starts. With ``stream=True`` returns an iterator of ``Chunk``; otherwise a
        ``Completion``. Calls from several threads run one at a time (see the module docstring).
        """
        start = time.perf_counter()
        request = self._request(prompt, params, overrides, cancel, truncate, start, probabilities)
        chunks = self._run(request)
        if stream:
            return chunks
        return _collect(chunks, request)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, stream: bool = False,
             add_generation_prompt: bool = True, cancel: threading.Event | None = None,
             truncate: Literal["error", "left"] = "error", probabilities: bool = False,
             **overrides: Any) -> Completion | Iterator[Chunk]:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the chat template, then
        ``generate`` from it; same options and results as ``generate``."""
        start = time.perf_counter()
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # The template writes BOS itself where the model wants one: no post-processor tokens.
        ids = self.encode(text, add_special_tokens=False)
        request = self._request(ids, params, overrides, cancel, truncate, start, probabilities)
        chunks = self._run(request)
        return chunks if stream else _collect(chunks, request)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len(token_ids), vocab] in float32: row t predicts token t + 1."""
        ids = self._check_ids(list(token_ids))
        if len(ids) > self.context_length:
            raise InputError(f"{len(ids)} tokens exceed the context length {self.context_length}")
        with self._lock:
            return self.decoder.prefill(ids, self.decoder.new_cache(len(ids)), chunk=PREFILL_CHUNK, all_logits=True)

    def close(self) -> None:
        with self._lock:
            self.decoder = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.decoder is None else f"layers={self.decoder.layers}"
        return f"LLM({self.name!r}, context_length={self.context_length}, {state})"

    # --- internals ----------------------------------------------------------------------------------------

    def _check_ids(self, ids: list) -> list[int]:
        if not ids:
            raise InputError("the prompt is empty")
        arr = np.asarray(ids)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= self.vocab_size:
            raise InputError(f"prompt token ids must be integers in 0..{self.vocab_size - 1}")
        return [int(i) for i in arr]

    def _request(self, prompt: str | list[int], params: SamplingParams | None, overrides: dict,
                 cancel: threading.Event | None, truncate: str, start: float, probabilities: bool = False) -> _Request:
        if params is not None and not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, not {type(params).__name__}")
        params = (params or SamplingParams()).with_overrides(**overrides).validate()
        if truncate not in ("error", "left"):
            raise InputError(f"truncate={truncate!r}: choose 'error' or 'left'")
        if self.decoder is None:
            raise InputError(f"{self.name}: this LLM is closed")
        if isinstance(prompt, str):
            ids = self.encode(prompt)
            if not ids:  # an empty text prompt starts from BOS when the model has one
                bos = self.generation.get("bos_token_id")
                ids = [int(bos)] if bos is not None else []
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = list(prompt)
        else:
            raise InputError(f"the prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        ids = self._check_ids(ids)
        room = self.context_length - params.max_tokens
        if len(ids) > room:
            if truncate == "error" or room < 1:
                raise InputError(
                    f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                    f"{len(ids) + params.max_tokens} exceeds the context length {self.context_length}; "
                    "shorten the prompt, lower max_tokens"
                    + (", or pass truncate='left' to drop the oldest prompt tokens" if room >= 1 else "")
                )
            ids = ids[len(ids) - room:]
        return _Request(ids, params, cancel, start, probabilities)

    def _run(self, request: _Request) -> Iterator[Chunk]:
        """The stream: holds the lock from the first ``next()`` until the last chunk or ``close()``.

        The lock is released before the last chunk is handed out, so a consumer that stops reading
        after it does not block other calls. While waiting for the lock, ``cancel`` is still honoured.
        """
        cancelled = request.cancel.is_set if request.cancel is not None else (lambda: False)
        while not self._lock.acquire(timeout=0.05):
            if cancelled():
                yield Chunk("", None, "cancelled", Usage(len(request.prompt_ids), 0),
                            Timings(total_seconds=time.perf_counter() - request.start))
                return
        held, steps = True, None
        try:
            if self.decoder is None:
                raise InputError(f"{self.name}: this LLM is closed")
            steps = self._steps(request, cancelled)
            for chunk in steps:
                if chunk.finish_reason is not None:
                    steps.close()
                    held = False
                    self._lock.release()
                    yield chunk
                    return
                yield chunk
        finally:
            if held:  # closed early by the consumer, or an error
                if steps is not None:
                    steps.close()
                self._lock.release()

    def _steps(self, request: _Request, cancelled: Callable[[], bool]) -> Iterator[Chunk]:
        """Prefill, then sample and feed back one token per step; the last chunk has a finish reason."""
        decoder, params, ids = self.decoder, request.params, request.prompt_ids
        eos = set(self.eos_token_ids)
        sampler = Sampler(params)
        cache = decoder.new_cache(len(ids) + params.max_tokens)
        timings = Timings()
        tokens: list[int] = []
        text = _StopText(params.stop)
        detok = _Detokenizer(self.tokenizer, ids)
        history = np.empty(len(ids) + params.max_tokens, np.int64)  # prompt + output, for the repetition penalty
        history[: len(ids)] = ids
        logits_buffer = np.empty((1, 1, self.vocab_size), decoder.logits_dtype)

        def final(piece: str, token: int | None, reason: FinishReason) -> Chunk:
            now = time.perf_counter()
            if tokens:
                timings.decode_seconds = now - (request.start + timings.time_to_first_token)
                if len(tokens) > 1 and timings.decode_seconds > 0:
                    timings.decode_tokens_per_second = (len(tokens) - 1) / timings.decode_seconds
            timings.total_seconds = now - request.start
            return Chunk(piece, token, reason, Usage(len(ids), len(tokens)), timings)

        prefill_start = time.perf_counter()
        logits = decoder.prefill(ids, cache, chunk=PREFILL_CHUNK, stop=cancelled)
        timings.prefill_seconds = time.perf_counter() - prefill_start
        timings.prefill_tokens_per_second = len(ids) / max(timings.prefill_seconds, 1e-9)
        if logits is None:
            yield final("", None, "cancelled")
            return
        n = len(ids)
        while True:
            token = sampler(logits, history[:n] if params.repetition_penalty != 1.0 else ())
            history[n] = token
            n += 1
            tokens.append(token)
            if len(tokens) == 1:
                timings.time_to_first_token = time.perf_counter() - request.start
            if token in eos:
                yield final(text.flush(), token, "stop")
                return
            piece, stopped = text.push(detok.step(token))
            if stopped:
                yield final(piece, token, "stop")
                return
            if len(tokens) >= params.max_tokens:
                yield final(piece + text.flush(), token, "length")
                return
            yield Chunk(piece, token, probability=_probability(logits, token) if request.probabilities else None)
            if cancelled():
                yield final(text.flush(), None, "cancelled")
                return
            logits = decoder.forward([token], cache, logits_out=logits_buffer)


def _probability(logits: np.ndarray, token: int) -> float:
    """softmax(logits)[token], shifted by the maximum so exp cannot overflow."""
    row = logits.reshape(-1).astype(np.float32, copy=False)
    top = row.max()
    return float(np.exp(row[token] - top) / np.exp(row - top).sum())


def _collect(chunks: Iterator[Chunk], request: _Request) -> Completion:
    pieces, tokens = [], []
    for chunk in chunks:
        pieces.append(chunk.text)
        if chunk.token_id is not None:
            tokens.append(chunk.token_id)
        if chunk.finish_reason is not None:
            return Completion("".join(pieces), tokens, len(request.prompt_ids), len(tokens), chunk.finish_reason,
                              chunk.timings or Timings())
    raise AssertionError("a generation stream ended without a finish reason")  # _run always ends with one


class _Detokenizer:
    """Token ids -> text, whole characters only (a character split over tokens waits for its last byte)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        # The prompt's last tokens give decoders that strip a leading space (Metaspace) their context;
        # a tail that ends inside a character would be emitted with the first piece, so it is left out.
        tail = prompt_ids[-4:]
        if "\ufffd" in tokenizer.decode(tail, skip_special_tokens=False):
            tail = []
        self.stream = DecodeStream(ids=tail, skip_special_tokens=False)

    def step(self, token: int) -> str:
        return self.stream.step(self.tokenizer, token) or ""


class _StopText:
    """The text so far, released only once it cannot be the start of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0  #: characters already released; they can never be part of a stop string

    def push(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; returns (text now safe to release, whether a stop string ended the text)."""
        if not self.stops:
            self.text += piece
            self.emitted = len(self.text)
            return piece, False
        search_from = max(self.emitted, len(self.text) - self.longest + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if found:
            end = min(found)
            out = self.text[self.emitted:end]
            self.text = self.text[:end]
            self.emitted = end
            return out, True
        pending = self.text[self.emitted:]
        hold = 0
        for s in self.stops:  # the longest tail of the text that a stop string starts with
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def _normalize_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"messages[{i}] must be a dict with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InputError(f"messages[{i}]: only text content parts are supported")
                texts.append(part["text"])
            message = {**message, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise InputError(f"messages[{i}]: content must be a string or a list of text parts")
        out.append(message)
    return out


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data
