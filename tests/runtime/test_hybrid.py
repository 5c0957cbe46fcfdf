"""Hybrid routing against real servers on 127.0.0.1 with real faults.

The "cloud" is (a) a second process serving SmolLM2-135M-Instruct with edgec's OpenAI-compatible
server, and (b) ``FaultServer``, a raw TCP server that misbehaves on demand and records every byte it
receives. The device is SmolLM2 in this process. Waits are bounded by the policy's timeouts; no test
asserts on wall-clock time.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")

from edgec.errors import InputError  # noqa: E402
from edgec.runtime import privacy  # noqa: E402
from edgec.runtime.cloud import CloudError, CloudModel  # noqa: E402
from edgec.runtime.device import DeviceMonitor, DeviceState, read_device_state  # noqa: E402
from edgec.runtime.hybrid import HybridLLM  # noqa: E402
from edgec.runtime.policy import Decision, Policy, Reason, Signals  # noqa: E402

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
FAST_RATES = {"prefill_tokens_per_second": 1e6, "decode_tokens_per_second": 1e6}


# --- the misbehaving cloud ---------------------------------------------------------------------------------


def _sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def _delta(text: str, finish: str | None = None) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


class FaultServer:
    """HTTP on a free 127.0.0.1 port; ``mode`` says how to answer, ``received`` holds every byte sent to it.

    modes: ok, placeholder, slow_first_byte, drip, 401, 404, 500, 429, reset_mid_stream, malformed_sse, wrong_json
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.received = bytearray()
        self.requests = 0
        self.release = threading.Event()  # ends a slow_first_byte wait
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(10)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        part = sock.recv(65536)
                        if not part:
                            return
                        data += part
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    while len(body) < length:
                        part = sock.recv(65536)
                        if not part:
                            break
                        body += part
                except OSError:
                    return
                with lock:
                    outer.received += head + b"\r\n\r\n" + body
                    outer.requests += 1
                outer.answer(sock, outer.mode)

        lock = threading.Lock()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, sock: socket.socket, mode: str) -> None:
        def send(status: str, body: bytes, ctype: str = "application/json", extra: str = "") -> None:
            sock.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                         f"Connection: close\r\n\r\n".encode() + body)

        error = json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode()
        if mode == "ok":
            send("200 OK", _sse(_delta("Paris"), _delta(" it is.", "stop"), "[DONE]"), "text/event-stream")
        elif mode == "placeholder":  # repeats a redacted value's placeholder, split across two events
            send("200 OK", _sse(_delta("Dear [EMA"), _delta("IL_1], hello!", "stop"), "[DONE]"), "text/event-stream")
        elif mode == "slow_first_byte":
            self.release.wait(10)
        elif mode == "drip":  # a byte at a time, each well within the read timeout, never finishing
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(100):
                if self.release.wait(0.1):
                    break
                sock.sendall(b"d")
        elif mode in ("401", "404"):
            send(f"{mode} Nope", error)
        elif mode == "500":
            send("500 Internal Server Error", error)
        elif mode == "429":
            send("429 Too Many Requests", error, extra="Retry-After: 0.05\r\n")
        elif mode == "malformed_sse":
            send("200 OK", b"data: {\"choices\": [{\"delta\": \ndata: [DONE]\n\n", "text/event-stream")
        elif mode == "wrong_json":
            send("200 OK", json.dumps({"result": "Paris"}).encode())
        elif mode == "reset_mid_stream":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            event = _sse(_delta("The capital"))
            sock.sendall(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            time.sleep(0.05)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault():
    server = FaultServer()
    yield server
    server.close()


# --- the real cloud: a second process serving SmolLM2 ----------------------------------------------------


@pytest.fixture(scope="module")
def local(smollm2_bundle):
    """The device: the compiled int4 bundle, held to a 1,024-token context so long prompts overflow it."""
    from edgec.bundle import open_bundle
    from edgec.runtime.llm import LLM

    llm = LLM.from_bundle(open_bundle(smollm2_bundle), context_length=1024)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def cloud_url(smollm2_bundle):
    """``edgec serve`` on the same bundle, in its own process, on a free port."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    edgec_command = Path(sys.executable).with_name("edgec")
    proc = subprocess.Popen([str(edgec_command), "serve", str(smollm2_bundle), "--port", str(port), "--name", "smollm2-cloud"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the cloud server did not start"
        try:
            httpx.get(f"{url}/models", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(15)


def hybrid(local, cloud, *, rates=FAST_RATES, device=None, **sections) -> HybridLLM:
    return HybridLLM(local=local, cloud=cloud, policy=Policy.from_dict(sections), rates=rates,
                     device=device or (lambda: DeviceState()))


def flaky_cloud(url: str, **options) -> CloudModel:
    return CloudModel(url, "m", **{"retries": 1, "backoff": 0.01, "read_timeout": 0.5, "total_timeout": 3.0,
                                   **options})


# --- faults: the other side answers, the reasons say what happened -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode, code", [("slow_first_byte", "cloud_timeout"), ("drip", "cloud_timeout"),
                                        ("500", "cloud_server_error"),
                                        ("429", "cloud_rate_limited"), ("reset_mid_stream", "cloud_connection"),
                                        ("malformed_sse", "cloud_malformed"), ("wrong_json", "cloud_malformed")])
def test_cloud_fault_is_answered_by_the_device(local, fault, mode, code):
    fault.mode = mode
    routed = hybrid(local, flaky_cloud(fault.url), route={"default": "cloud-then-local"})
    chunks = list(routed.chat(FRANCE, max_tokens=12, stream=True))
    final = chunks[-1]
    assert final.route == "cloud-then-local" and final.finish_reason in ("stop", "length")
    assert [r.code for r in final.reasons][-1] == code, final.reasons
    text = "".join(c.text for c in chunks)
    assert text.strip()
    if mode == "reset_mid_stream":  # what the cloud had sent is kept; the device continues after it
        assert text.startswith("The capital") and len(text) > len("The capital")
        assert "mid-stream" in final.reasons[-1].text
    # retries happened only where safe: 429/500/timeout once more, nothing after output had started
    # (a drip exhausts the whole time limit, so there is no time left to retry)
    assert fault.requests == (1 if mode in ("reset_mid_stream", "malformed_sse", "wrong_json", "drip") else 2)


@pytest.mark.slow
def test_cloud_fault_non_streaming_and_circuit_breaker(local, fault):
    fault.mode = "500"
    routed = hybrid(local, flaky_cloud(fault.url, retries=0, breaker_failures=2, breaker_cooldown=600),
                    route={"default": "cloud-then-local"})
    for _ in range(2):
        done = routed.chat(FRANCE, max_tokens=8)
        assert done.route == "cloud-then-local" and done.text
    assert fault.requests == 2 and not routed.cloud.available()
    done = routed.chat(FRANCE, max_tokens=8)  # the breaker is open: the cloud is not even tried
    assert done.route == "local" and [r.code for r in done.reasons] == ["cloud_unavailable"]
    assert fault.requests == 2


def test_cloud_client_errors(fault):
    cloud = flaky_cloud(fault.url, retries=0)
    fault.mode = "wrong_json"
    with pytest.raises(CloudError) as exc:
        cloud.chat(FRANCE, max_tokens=4)
    assert exc.value.code == "malformed"
    fault.mode = "ok"
    chunks = list(cloud.chat(FRANCE, max_tokens=4, stream=True))
    assert "".join(c.text for c in chunks) == "Paris it is." and chunks[-1].finish_reason == "stop"
    cancel = threading.Event()
    cancel.set()
    assert list(cloud.chat(FRANCE, max_tokens=4, stream=True, cancel=cancel))[-1].finish_reason == "cancelled"
    for mode, code, hint in (("401", "unauthorized", "check the API key"), ("404", "not_found", "check base_url")):
        fault.mode, before = mode, fault.requests
        with pytest.raises(CloudError, match=hint) as exc:
            list(flaky_cloud(fault.url, retries=3).chat(FRANCE, max_tokens=4, stream=True))
        assert exc.value.code == code and fault.requests == before + 1  # never retried
    os.environ.pop("EDGEC_TEST_MISSING_KEY", None)
    with pytest.raises(CloudError, match="EDGEC_TEST_MISSING_KEY"):
        CloudModel(fault.url, "m", api_key_env="EDGEC_TEST_MISSING_KEY").chat(FRANCE, max_tokens=4)
    with pytest.raises(InputError, match="base_url"):
        CloudModel("ftp://x", "m")


def test_api_key_is_sent_but_never_logged(fault, tmp_path, local, monkeypatch):
    monkeypatch.setenv("EDGEC_TEST_KEY", "sk-secret-123")
    fault.mode = "ok"
    cloud = CloudModel(fault.url, "m", api_key_env="EDGEC_TEST_KEY")
    assert "sk-secret" not in repr(cloud)
    audit = tmp_path / "audit.jsonl"
    routed = hybrid(local, cloud, route={"default": "cloud"}, audit={"path": str(audit)})
    assert routed.chat(FRANCE, max_tokens=4).route == "cloud"
    assert b"Authorization: Bearer sk-secret-123" in bytes(fault.received)
    assert "sk-secret" not in audit.read_text()


# --- privacy ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_personal_data_and_local_only_never_reach_the_cloud(local, fault, tmp_path):
    fault.mode = "ok"
    routed = hybrid(local, flaky_cloud(fault.url), route={"default": "cloud"})
    email = [{"role": "user", "content": "Write a short greeting to jane.doe@example.com"}]
    done = routed.chat(email, max_tokens=8)
    assert done.route == "local" and [r.code for r in done.reasons] == ["personal_data"]
    flagged = [{"role": "user", "content": "Tell me a secret about the moon", "local_only": True}]
    done = routed.chat(flagged, max_tokens=8)
    assert done.route == "local" and done.reasons[0].code == "local_only"
    assert routed.chat(FRANCE, max_tokens=8, local_only=True).route == "local"
    assert fault.requests == 0 and bytes(fault.received) == b""

    audit = tmp_path / "audit.jsonl"
    redacting = hybrid(local, flaky_cloud(fault.url), route={"default": "cloud"},
                       privacy={"personal_data": "redact"}, audit={"path": str(audit)})
    done = redacting.chat(email, max_tokens=8)
    assert done.route == "cloud" and [r.code for r in done.reasons][0] == "redacted"
    assert b"jane.doe" not in bytes(fault.received) and b"[EMAIL_1]" in bytes(fault.received)
    record = json.loads(audit.read_text().splitlines()[-1])
    assert record["sent"]["messages"][0]["content"] == "Write a short greeting to [EMAIL_1]"
    assert "jane.doe" not in audit.read_text()
    # the answer names the placeholder: the device puts the address back for the user, as it streams
    fault.mode = "placeholder"
    pieces = [c.text for c in redacting.chat(email, max_tokens=8, stream=True)]
    assert "".join(pieces) == "Dear jane.doe@example.com, hello!" and not any("[EMA" in p for p in pieces)
    assert bytes(fault.received).count(b"jane.doe") == 0


def test_privacy_detector():
    text = "Mail jane@example.com, call +1 415 555 0100, card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00"
    assert [f.kind for f in privacy.find(text)] == ["email", "phone", "card", "iban"]
    assert privacy.find("order 4111 1111 1111 1112 shipped in 2024") == []  # fails the Luhn check
    redacted, mapping = privacy.redact("a@b.io wrote to a@b.io and c@d.io")
    assert redacted == "[EMAIL_1] wrote to [EMAIL_1] and [EMAIL_2]" and mapping["[EMAIL_2]"] == "c@d.io"
    restore = privacy.Restorer(mapping)
    pieces = [restore.push(p) for p in ("Hi [", "EMAIL_2], [x] and [EMAIL_", "1]", " [EMAIL_")] + [restore.flush()]
    assert pieces == ["Hi ", "c@d.io, [x] and ", "a@b.io", " ", "[EMAIL_"]  # an unfinished one is given as it is


# --- capability, deadline, device, cost, from real signals ------------------------------------------------


@pytest.mark.slow
def test_real_cloud_answers_and_long_prompts_go_there(local, cloud_url):
    cloud = CloudModel(cloud_url, "smollm2-cloud", context_length=2048)
    routed = hybrid(local, cloud, route={"default": "cloud"})
    done = routed.chat(FRANCE, max_tokens=24, temperature=0)
    assert done.route == "cloud" and "Paris" in done.text
    assert done.text == local.chat(FRANCE, max_tokens=24).text  # same model on both sides, greedy

    from pydoc_data.topics import topics

    long = local.decode(local.encode(topics["import"], add_special_tokens=False)[:1300])
    assert 1024 < local.count_tokens(long) < 1900
    device_first = hybrid(local, cloud, route={"default": "local"})
    done = device_first.chat([{"role": "user", "content": long + "\nSummarize."}], max_tokens=8)
    assert done.route == "cloud" and done.reasons[0].code == "context" and done.text


@pytest.mark.slow
def test_deadline_routing_from_measured_rates(local, fault):
    from edgec.runtime.bench import rates_file, store_rates

    fault.mode = "ok"
    assert local.artifact_sha256
    store_rates(local.artifact_sha256, {"prefill_tokens_per_second": 500.0, "decode_tokens_per_second": 20.0,
                                        "time_to_first_token_ms": 50.0, "prompt_tokens": 128, "threads": 0})
    try:
        routed = HybridLLM(local=local, cloud=flaky_cloud(fault.url), device=lambda: DeviceState(),
                           policy=Policy.from_dict({"route": {"default": "local"}}))
        assert routed.rates_source == "measured"
        # ~36 prompt tokens / 500 + 40 tokens / 20 ≈ 2.1 s against a 1 s budget: the cloud
        done = routed.chat(FRANCE, max_tokens=40, deadline_s=1.0)
        assert done.route == "cloud" or done.route == "cloud-then-local"
        assert done.reasons[0].code == "deadline" and "measured" in done.reasons[0].text
        assert done.text == "Paris it is."
        done = routed.chat(FRANCE, max_tokens=8, deadline_s=1.0)  # 8 / 20 = 0.4 s fits
        assert done.route == "local" and done.reasons[0].code == "default"
    finally:
        rates_file(local.artifact_sha256).unlink()
    # a cloud that never answers is given only the request's budget, not its own 60 s total
    fault.mode = "slow_first_byte"
    slow = hybrid(local, CloudModel(fault.url, "m", read_timeout=60, total_timeout=60, retries=0),
                  rates={"prefill_tokens_per_second": 1e6, "decode_tokens_per_second": 1.0})
    done = slow.chat(FRANCE, max_tokens=8, deadline_s=1.0)
    assert done.route == "cloud-then-local" and [r.code for r in done.reasons] == ["deadline", "cloud_timeout"]
    assumed = HybridLLM(local=local, cloud=flaky_cloud(fault.url), device=lambda: DeviceState())
    assert assumed.rates_source == "assumed"
    assert "assumed" in assumed.route(FRANCE, max_tokens=100, deadline_s=0.5).reasons[0].text


def test_policy_rules_on_signals():
    policy = Policy.from_dict({"cloud": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
                               "budget": {"max_usd": 0.01}, "capability": {"local_features": []}})
    base = dict(prompt_tokens=100, max_tokens=50, local_context=1024)
    assert policy.decide(Signals(**base)).route == "local"
    assert policy.decide(Signals(**base, device=DeviceState(battery_percent=10, charging=False))).reasons[0].code \
        == "battery_low"
    assert policy.decide(Signals(**base, device=DeviceState(battery_percent=10, charging=True))).route == "local"
    assert policy.decide(Signals(**base, device=DeviceState(temperature_c=95))).route == "cloud-then-local"
    assert policy.decide(Signals(**base, device=DeviceState(memory_available_mb=100))).reasons[0].code == "memory_low"
    assert policy.decide(Signals(**base, features=frozenset({"tools"}))).reasons[0].code == "feature"
    assert policy.decide(Signals(**base, cloud_cost_usd=0.02, device=DeviceState(temperature_c=95))).route == "local"
    assert policy.decide(Signals(**base, cloud_available=False, device=DeviceState(temperature_c=95))).reasons[0].code \
        == "cloud_unavailable"
    assert policy.decide(Signals(**{**base, "prompt_tokens": 1020})).route == "cloud"

    def hook(signals, decision):
        if signals.prompt_tokens > 50:
            return Decision("cloud-then-local", [Reason("custom", "long prompts go to the cloud")])
        return None

    policy.hook = hook
    assert policy.decide(Signals(**base)).reasons[0].code == "custom"


def test_policy_toml_and_errors(tmp_path):
    example = Path(__file__).parents[2] / "docs" / "policy.example.toml"
    policy = Policy.from_toml(example)
    assert policy.cloud.model and policy.route.default in ("local", "local-then-cloud")
    bad = tmp_path / "bad.toml"
    for text, message in [("[route]\ndefault = 'sideways'", "choose local"), ("[rout]\n", "unknown section"),
                          ("[cloud]\nretries = 'two'", "must be an integer"), ("[cloud\n", "not valid TOML"),
                          ("[hook]\nfunction = 'nope.nothing:fn'", "cannot import"),
                          ("[privacy]\ndetect = ['dna']", "unknown kind")]:
        bad.write_text(text)
        with pytest.raises(InputError, match=message):
            Policy.from_toml(bad)
    hooked = tmp_path / "hooked.toml"
    hooked.write_text("[hook]\nfunction = 'os.path:join'\n")
    assert Policy.from_toml(hooked).hook is os.path.join


def test_device_state_from_sys(tmp_path, monkeypatch):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)  # as on this VM: no battery psutil can see
    battery = tmp_path / "sys/class/power_supply/BAT0"
    battery.mkdir(parents=True)
    (battery / "type").write_text("Battery\n")
    (battery / "capacity").write_text("15\n")
    (battery / "status").write_text("Discharging\n")
    for i, temp in enumerate(("45000", "71500")):
        zone = tmp_path / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "temp").write_text(temp)
    state = read_device_state(tmp_path / "sys", tmp_path / "proc")
    assert (state.battery_percent, state.charging, state.temperature_c) == (15.0, False, 71.5)
    assert state.memory_available_mb > 0  # psutil reads the real machine
    assert read_device_state(tmp_path / "empty", tmp_path / "empty").temperature_c is None
    calls = []
    monitor = DeviceMonitor(lambda: calls.append(1) or DeviceState(), max_age=60)
    monitor.state(), monitor.state()
    assert calls == [1]


# --- mid-stream hand-off ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_handoff_mid_stream_is_one_continuous_answer(local, cloud_url, tmp_path):
    cloud = CloudModel(cloud_url, "smollm2-cloud", context_length=2048)
    audit = tmp_path / "audit.jsonl"
    # an impossible confidence bar: the device hands over after its first 4 tokens
    routed = hybrid(local, cloud, route={"default": "local-then-cloud"}, audit={"path": str(audit)},
                    confidence={"window": 4, "min_tokens": 4, "min_probability": 0.999999})
    chunks = list(routed.chat(FRANCE, max_tokens=24, stream=True, temperature=0))
    final = chunks[-1]
    assert final.route == "local-then-cloud" and [r.code for r in final.reasons] == ["default", "low_confidence"]
    local_part = "".join(c.text for c in chunks if c.route == "local")
    probabilities = [c.probability for c in chunks if c.route == "local" and c.finish_reason is None]
    assert len(probabilities) >= 4 and all(0 < p <= 1 for p in probabilities)
    text = "".join(c.text for c in chunks)
    assert local_part and len(text) > len(local_part) and text.startswith(local_part)
    record = json.loads(audit.read_text().splitlines()[-1])
    assert record["event"] == "handoff" and record["sent"]["prefix"] == local_part
    # the cloud (the same model, greedy) continued the device's message rather than starting a new one:
    # the whole answer is what the device alone would have said
    assert text == local.chat(FRANCE, max_tokens=24).text
    assert final.usage.completion_tokens == 24 or final.finish_reason == "stop"


# --- served: the routed model looks like any OpenAI model -------------------------------------------------


@pytest.mark.slow
def test_served_routed_model_reports_route(local, fault):
    openai = pytest.importorskip("openai")
    from tests.runtime.test_server import Server

    fault.mode = "500"
    routed = hybrid(local, flaky_cloud(fault.url, retries=0), route={"default": "cloud-then-local"})
    with Server({"smollm2": routed}) as server:
        client = server.client()
        answer = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content
        assert answer.model_extra["edgec"]["route"] == "cloud-then-local"
        assert answer.model_extra["edgec"]["reasons"][-1]["code"] == "cloud_server_error"
        chunks = list(client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=8, stream=True,
                                                     extra_body={"local_only": True}))
        assert chunks[-1].model_extra["edgec"]["route"] == "local"
        assert chunks[-1].model_extra["edgec"]["reasons"][0]["code"] == "local_only"
        # a prompt the device cannot hold, and a failing cloud: an error the client can read, not a hang
        from pydoc_data.topics import topics

        long = local.decode(local.encode(topics["import"], add_special_tokens=False)[:1100])
        routed.cloud.context_length = 2048
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": long}], max_tokens=8)
        assert exc.value.status_code == 502 and "cannot answer instead" in exc.value.message


def test_cli_routing_flags_need_policy_and_prompt(tmp_path):
    from click.testing import CliRunner

    from edgec.cli import main

    for args, message in ((["--explain", "--prompt", "hi"], "need --policy"),
                          (["--policy", "p.toml"], "need --prompt")):
        result = CliRunner().invoke(main, ["run", str(tmp_path / "none.edgec"), *args])
        assert result.exit_code == 2 and message in result.output


@pytest.mark.slow
def test_cli_run_with_policy_explains_the_route(smollm2_bundle, cloud_url, tmp_path):
    """`edgec run --policy --explain` on the real bundle: the cloud answers by default, and a local-only
    request stays on the device; both say why."""
    from click.testing import CliRunner

    from edgec.cli import main

    policy = tmp_path / "policy.toml"
    policy.write_text(f'[cloud]\nbase_url = "{cloud_url}"\nmodel = "smollm2-cloud"\n\n[route]\ndefault = "cloud"\n')
    args = ["run", str(smollm2_bundle), "--policy", str(policy), "--prompt", "What is the capital of France?",
            "--max-tokens", "16", "--explain"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output and "route: cloud" in result.output, result.output
    result = CliRunner().invoke(main, [*args, "--local-only", "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.output)
    assert done["route"] == "local" and done["reasons"][0]["code"] == "local_only"
