"""``HybridLLM``: a local ``LLM`` and a ``CloudModel`` behind one ``generate()``/``chat()``, routed per
request (and, for ``local-then-cloud``, during generation) by a ``Policy``; every result says which
side answered (``route``) and why (``reasons``).

    hybrid = HybridLLM(local=edgec.load("smollm2.edgec"), policy="policy.toml")   # cloud from [cloud]
    done = hybrid.chat([{"role": "user", "content": "..."}], max_tokens=64, deadline_s=2.0)
    done.route, [r.code for r in done.reasons]

Routes of an answer (``route`` on the result; the policy's ``Decision`` names where it starts):
    local / cloud        one side produced all of it
    local-then-cloud     the device started, its confidence dropped (mean token probability over the
                         policy's window), the cloud continued the same answer from the device's text
    cloud-then-local     the cloud failed (error, timeout, garbage, mid-stream reset), the device
                         answered or continued from what the cloud had already sent

Nothing the user asked is lost: a fallback gets the whole conversation plus the partial answer. If the
fallback fails too, its error is raised. What is sent to the cloud is written, redacted, to the
policy's audit log (JSONL) before it is sent.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from edgec.errors import InputError
from edgec.runtime import privacy
from edgec.runtime.cloud import CloudError, CloudModel
from edgec.runtime.device import DeviceMonitor, DeviceState
from edgec.runtime.llm import LLM, Chunk, Completion, Timings, Usage
from edgec.runtime.policy import Decision, Policy, Reason, Signals
from edgec.runtime.sampling import SamplingParams


@dataclass
class RoutedCompletion(Completion):
    route: str = "local"
    reasons: list[Reason] = field(default_factory=list)


@dataclass
class RoutedChunk(Chunk):
    """``route``: the route so far (the last chunk's is the answer's); ``reasons`` grow as things happen."""

    route: str = "local"
    reasons: list[Reason] = field(default_factory=list)


@dataclass
class _Request:
    messages: list[dict] | None  #: chat
    prompt: str | None  #: plain completion
    params: SamplingParams
    cancel: threading.Event | None
    prompt_tokens: int
    signals: Signals
    decision: Decision
    start: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class HybridLLM:
    """See the module docstring. ``policy``: a ``Policy``, the path of a policy TOML, or None (the
    defaults: device only unless ``cloud`` is given). ``cloud`` defaults to the policy's ``[cloud]``.
    ``device``: a ``DeviceMonitor`` or a function returning a ``DeviceState`` (tests inject one).
    ``rates``: measured ``prefill_tokens_per_second``/``decode_tokens_per_second``; default: what
    ``edgec bench`` stored for the local bundle on this device, else the policy's assumed rates.
    """

    takes_messages = True  #: the server hands chat requests over as messages, not token ids

    def __init__(self, local: LLM, cloud: CloudModel | None = None, policy: Policy | str | Path | None = None, *,
                 device: DeviceMonitor | Callable[[], DeviceState] | None = None, rates: dict | None = None) -> None:
        if isinstance(policy, (str, Path)):
            policy = Policy.from_toml(policy)
        self.policy = (policy or Policy()).check()
        self.local = local
        self.cloud = cloud if cloud is not None else self.policy.cloud_model()
        self.device = device if isinstance(device, DeviceMonitor) else DeviceMonitor(device) if device else DeviceMonitor()
        self.rates, self.rates_source = _rates(local, rates, self.policy)
        self.name = local.name
        self.generation = local.generation
        self.spent_usd = 0.0
        self._lock = threading.Lock()

    # --- the LLM surface the server and the CLI use -------------------------------------------------------

    @property
    def context_length(self) -> int:
        return max(self.local.context_length, (self.cloud.context_length or 0) if self.cloud else 0)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.local.encode(text, add_special_tokens=add_special_tokens)

    def count_tokens(self, text: str) -> int:
        return self.local.count_tokens(text)

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return self.local.apply_chat_template(messages, **kwargs)

    def close(self) -> None:
        if self.cloud is not None:
            self.cloud.close()
        self.local.close()

    def __enter__(self) -> HybridLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- generation ---------------------------------------------------------------------------------------

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, stream: bool = False,
             cancel: threading.Event | None = None, local_only: bool = False, deadline_s: float | None = None,
             features: tuple[str, ...] = (), **overrides: Any) -> RoutedCompletion | Iterator[RoutedChunk]:
        """As ``LLM.chat``, routed. A message with ``"local_only": True`` makes the whole request local-only;
        ``deadline_s`` is the latency budget; ``features`` what the request needs (e.g. "tools")."""
        start = time.perf_counter()
        text = self.local.apply_chat_template(messages)
        prompt_tokens = len(self.local.encode(text, add_special_tokens=False))
        local_only = local_only or any(isinstance(m, dict) and m.get("local_only") for m in messages)
        contents = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
        request = self._request(messages, None, contents, prompt_tokens, params, overrides, cancel, local_only,
                                deadline_s, features, start)
        return self._answer(request, stream)

    def generate(self, prompt: str, params: SamplingParams | None = None, *, stream: bool = False,
                 cancel: threading.Event | None = None, local_only: bool = False, deadline_s: float | None = None,
                 features: tuple[str, ...] = (), **overrides: Any) -> RoutedCompletion | Iterator[RoutedChunk]:
        """As ``LLM.generate`` on a text prompt, routed."""
        if not isinstance(prompt, str):
            raise InputError("HybridLLM.generate takes a text prompt (the cloud cannot read local token ids)")
        start = time.perf_counter()
        request = self._request(None, prompt, [prompt], self.local.count_tokens(prompt), params, overrides, cancel,
                                local_only, deadline_s, features, start)
        return self._answer(request, stream)

    def route(self, messages: list[dict] | None = None, prompt: str | None = None, **options: Any) -> Decision:
        """The decision for a request, without running it (what ``--explain`` shows first)."""
        if messages is not None:
            done = self.chat(messages, stream=True, **options)
        else:
            done = self.generate(prompt, stream=True, **options)
        decision = done.request.decision
        done.close()
        return decision

    def _request(self, messages, prompt, contents, prompt_tokens, params, overrides, cancel, local_only, deadline_s,
                 features, start) -> _Request:
        if params is not None and not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, not {type(params).__name__}")
        params = (params or SamplingParams()).with_overrides(**overrides).validate()
        signals = self.signals(prompt_tokens, params.max_tokens, contents, local_only,
                               self.policy.route.deadline_s if deadline_s is None else deadline_s, features)
        decision = self.policy.decide(signals)
        return _Request(messages, prompt, params, cancel, prompt_tokens, signals, decision, start)

    def signals(self, prompt_tokens: int, max_tokens: int, contents: list[str], local_only: bool,
                deadline_s: float | None, features: tuple[str, ...] = ()) -> Signals:
        """What the policy decides on, for a request with these properties."""
        p = self.policy
        found = sorted({f.kind for text in contents for f in privacy.find(text, p.privacy.detect)})
        local_tokens = max(0, min(max_tokens, self.local.context_length - prompt_tokens))
        estimate = (prompt_tokens / self.rates["prefill_tokens_per_second"]
                    + local_tokens / self.rates["decode_tokens_per_second"])
        cost = (prompt_tokens * p.cloud.usd_per_1k_prompt_tokens + max_tokens * p.cloud.usd_per_1k_completion_tokens) / 1000
        return Signals(prompt_tokens=prompt_tokens, max_tokens=max_tokens, local_context=self.local.context_length,
                       local_only=local_only, personal_data=tuple(found), features=frozenset(features),
                       deadline_s=deadline_s, local_estimate_s=estimate, rates_source=self.rates_source,
                       device=self.device.state(), cloud_configured=self.cloud is not None,
                       cloud_available=self.cloud is not None and self.cloud.available(),
                       cloud_context=self.cloud.context_length if self.cloud else None, cloud_cost_usd=cost,
                       spent_usd=self.spent_usd)

    def _answer(self, request: _Request, stream: bool):
        if request.decision.route == "cloud" and self.cloud is None:
            raise InputError(f"{self.name}: the request needs the cloud ({_why(request.decision)}) and no cloud "
                             "endpoint is configured")
        if request.decision.route == "local" and request.prompt_tokens >= self.local.context_length:
            raise InputError(f"{self.name}: the request must be answered on the device ({_why(request.decision)}) "
                             f"but its {request.prompt_tokens} prompt tokens do not fit the local context of "
                             f"{self.local.context_length}; shorten it")
        run = _Run(self, request)
        return run if stream else run.collect()

    def _spend(self, request: _Request, usage: Usage | None) -> None:
        c = self.policy.cloud
        if usage is None or not usage.prompt_tokens:
            cost = request.signals.cloud_cost_usd
        else:
            cost = (usage.prompt_tokens * c.usd_per_1k_prompt_tokens
                    + usage.completion_tokens * c.usd_per_1k_completion_tokens) / 1000
        with self._lock:
            self.spent_usd += cost

    def _audit(self, request: _Request, kind: str, sent: dict) -> None:
        path = self.policy.audit.path
        if not path:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "request": request.id, "event": kind,
                  "endpoint": self.cloud.base_url, "model": self.cloud.model,
                  "reasons": [r.as_dict() for r in request.decision.reasons],
                  # the log itself never holds personal data, whatever the policy lets through to the cloud
                  "sent": json.loads(privacy.redact(json.dumps(sent, ensure_ascii=False))[0])}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)


class _Run:
    """One routed generation: an iterator of ``RoutedChunk`` that switches sides as the policy says."""

    def __init__(self, hybrid: HybridLLM, request: _Request) -> None:
        self.hybrid, self.request = hybrid, request
        self.route = "cloud" if request.decision.route in ("cloud", "cloud-then-local") else "local"
        self.reasons = list(request.decision.reasons)
        self.text = ""  #: what the user has been given so far
        self.completion_tokens = 0
        self.first_text_at: float | None = None
        self._chunks = self._generate()

    def __iter__(self) -> _Run:
        return self

    def __next__(self) -> RoutedChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def collect(self) -> RoutedCompletion:
        tokens = []
        for chunk in self:
            if chunk.token_id is not None:
                tokens.append(chunk.token_id)
            if chunk.finish_reason is not None:
                return RoutedCompletion(self.text, tokens, self.request.prompt_tokens, chunk.usage.completion_tokens,
                                        chunk.finish_reason, chunk.timings, chunk.route, chunk.reasons)
        raise AssertionError("a routed stream ended without a finish reason")

    # --- the route ----------------------------------------------------------------------------------------

    def _generate(self) -> Iterator[RoutedChunk]:
        decision = self.request.decision.route
        if decision in ("cloud", "cloud-then-local"):
            try:
                finish = yield from self._cloud()
            except CloudError as error:
                if decision == "cloud":
                    raise CloudError(f"{error} (the device cannot answer instead: {_why(self.request.decision)})",
                                     error.code, error.status) from error
                self._switch("cloud-then-local", error)
                finish = yield from self._local(watch=False)
        else:
            finish = yield from self._local(watch=decision == "local-then-cloud")
            if finish == "handoff":
                self.route = "local-then-cloud"
                try:
                    finish = yield from self._cloud()
                except CloudError as error:
                    self._switch("local-then-cloud-then-local", error)
                    finish = yield from self._local(watch=False)
        yield self._final(finish)

    def _switch(self, route: str, error: CloudError) -> None:
        self.route = route
        where = "mid-stream" if error.partial else "before answering"
        self.reasons.append(Reason(f"cloud_{error.code}", f"the cloud failed {where}: {error}; the device "
                                                          "continues"))

    def _piece(self, text: str, token_id: int | None = None, probability: float | None = None) -> RoutedChunk:
        if text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.text += text
        return RoutedChunk(text, token_id, probability=probability, route=self.route, reasons=self.reasons)

    def _final(self, finish: str) -> RoutedChunk:
        now = time.perf_counter()
        start = self.request.start
        ttft = (self.first_text_at or now) - start
        timings = Timings(time_to_first_token=ttft, decode_seconds=now - start - ttft, total_seconds=now - start)
        if self.completion_tokens > 1 and timings.decode_seconds > 0:
            timings.decode_tokens_per_second = (self.completion_tokens - 1) / timings.decode_seconds
        return RoutedChunk("", None, finish, Usage(self.request.prompt_tokens, self.completion_tokens), timings,
                           route=self.route, reasons=self.reasons)

    def _remaining(self) -> int:
        return self.request.params.max_tokens - self.completion_tokens

    # --- the device ---------------------------------------------------------------------------------------

    def _local(self, watch: bool) -> Iterator[RoutedChunk]:
        """Local chunks until the finish (returned), or "handoff" when ``watch`` sees confidence drop."""
        req, local, conf = self.request, self.hybrid.local, self.hybrid.policy.confidence
        if req.messages is not None:
            prompt = local.encode(local.apply_chat_template(req.messages) + self.text, add_special_tokens=False)
        else:
            prompt = local.encode(req.prompt + self.text)
        room = local.context_length - len(prompt)
        if room < 1:
            return "length"
        remaining = self._remaining()
        if remaining < 1:
            return "length"
        params = SamplingParams(**{**vars(req.params), "max_tokens": min(remaining, room)})
        window: deque[float] = deque(maxlen=conf.window)
        stream = local.generate(prompt, params, stream=True, cancel=req.cancel, probabilities=watch)
        produced = 0
        try:
            for chunk in stream:
                if chunk.token_id is not None:
                    self.completion_tokens += 1
                    produced += 1
                if chunk.finish_reason is not None:
                    if chunk.text:
                        yield self._piece(chunk.text, chunk.token_id)
                    return chunk.finish_reason
                yield self._piece(chunk.text, chunk.token_id, chunk.probability)
                if watch and chunk.probability is not None:
                    window.append(chunk.probability)
                    mean = sum(window) / len(window)
                    if produced >= conf.min_tokens and len(window) == conf.window and mean < conf.min_probability:
                        if self.hybrid.cloud is not None and self.hybrid.cloud.available():
                            self.reasons.append(Reason("low_confidence", (
                                f"after {produced} tokens the device's mean token probability over the last "
                                f"{conf.window} was {mean:.2f} (policy minimum {conf.min_probability:g}); the cloud "
                                "continues")))
                            return "handoff"
        finally:
            stream.close()
        return "stop"

    # --- the cloud ----------------------------------------------------------------------------------------

    def _cloud(self) -> Iterator[RoutedChunk]:
        hybrid, req = self.hybrid, self.request
        cloud = hybrid.cloud
        redact = req.decision.redact
        placeholders: dict[str, str] = {}

        def clean(text: str) -> str:
            nonlocal placeholders
            if not redact:
                return text
            text, placeholders = privacy.redact(text, hybrid.policy.privacy.detect, placeholders)
            return text

        max_tokens = self._remaining()
        if max_tokens < 1:
            return "length"
        params = SamplingParams(**{**vars(req.params), "max_tokens": max_tokens})
        timeout = req.signals.deadline_s
        if timeout is not None:
            timeout = max(timeout - (time.perf_counter() - req.start), 0.05)
        prefix = clean(self.text)
        if req.messages is not None:
            messages = [{"role": m["role"], "content": clean(m["content"]) if isinstance(m.get("content"), str)
                         else m.get("content")} for m in req.messages]
            sent = {"messages": messages, "prefix": prefix}
            hybrid._audit(req, "handoff" if prefix else "request", sent)
            stream = cloud.chat(messages, params, stream=True, cancel=req.cancel, timeout=timeout, prefix=prefix)
        else:
            sent = {"prompt": clean(req.prompt) + prefix}
            hybrid._audit(req, "handoff" if prefix else "request", sent)
            stream = cloud.generate(sent["prompt"], params, stream=True, cancel=req.cancel, timeout=timeout)
        restore = privacy.Restorer(placeholders)
        pieces = 0  # counted as tokens until the cloud's usage says how many there were
        try:
            for chunk in stream:
                if chunk.finish_reason is not None:
                    if chunk.usage is not None and chunk.usage.completion_tokens:
                        self.completion_tokens += chunk.usage.completion_tokens - pieces
                    hybrid._spend(req, chunk.usage)
                    text = restore.push(chunk.text) + restore.flush()
                    if text:
                        yield self._piece(text)
                    return chunk.finish_reason
                pieces += 1
                self.completion_tokens += 1
                yield self._piece(restore.push(chunk.text))
        except CloudError:
            hybrid._spend(req, None)
            raise
        finally:
            stream.close()
        return "stop"


def _why(decision: Decision) -> str:
    return "; ".join(r.text for r in decision.reasons)


def _rates(local: LLM, given: dict | None, policy: Policy) -> tuple[dict, str]:
    if given is not None:
        return given, "given"
    sha = getattr(local, "artifact_sha256", None)
    if sha:
        from edgec.runtime.bench import rates_file

        try:
            stored = json.loads(rates_file(sha).read_text())
            if stored.get("prefill_tokens_per_second", 0) > 0 and stored.get("decode_tokens_per_second", 0) > 0:
                return stored, "measured"
        except (OSError, ValueError):
            pass
    d = policy.deadline
    return {"prefill_tokens_per_second": d.assumed_prefill_tokens_per_second,
            "decode_tokens_per_second": d.assumed_decode_tokens_per_second}, "assumed"
