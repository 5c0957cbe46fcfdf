"""Hybrid routing: the cost of deciding, and a mixed workload routed vs all-local vs all-cloud.

1. Routing overhead per request in microseconds: ``Policy.decide`` alone, and signals + decide
   (personal-data scan, device state from its cache, the local-time estimate) on a short chat turn.
   Tokenizing the prompt is not counted: every request does it with or without routing.
2. A fixed mixed workload of chat requests (short questions, prompts with personal data, prompts
   longer than the device's 1024-token context, requests with a tight deadline), run three ways,
   interleaved in rounds: all-local (over-long prompts truncated), all-cloud, and routed by a
   ``local-then-cloud`` policy. The device is SmolLM2-135M (int4 GGUF) in this process; the "cloud"
   is the same model served by edgec's OpenAI-compatible server in a second process on the same
   machine, so the cloud is not faster here than the device: the figures show routing's overhead
   and the share answered locally, not a real cloud's speed.

Usage: python tools/bench/hybrid.py [--rounds 3] [--max-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVE = """
import sys
from edgec.runtime.llm import LLM
from edgec.runtime.server import serve
serve({"cloud": LLM.from_dir(sys.argv[1], context_length=2048)}, port=int(sys.argv[2]), log_level="warning")
"""


def workload(llm) -> list[dict]:
    from pydoc_data.topics import topics

    def long(topic: str) -> str:
        return llm.decode(llm.encode(topics[topic], add_special_tokens=False)[:1200]) + "\n\nSummarize this in one sentence."

    ask = lambda text, **o: {"messages": [{"role": "user", "content": text}], **o}  # noqa: E731
    return [
        ask("What is the capital of France?"),
        ask("Write one sentence about the sea."),
        ask("Draft a short note to alice@example.com saying the meeting moved to Friday."),
        ask("My phone is +44 20 7946 0958; remind me how to reset my voicemail."),
        ask(long("import")),
        ask("List three fruits.", deadline_s=0.3),
        ask("Translate 'good morning' into French."),
        ask("What is 2 + 2?"),
        ask(long("typesseq")),
        ask("Explain recursion in one sentence.", deadline_s=0.5),
    ]


def routing_overhead(hybrid, repeats: int = 20000) -> dict:
    from edgec.runtime.policy import Signals

    signals = Signals(prompt_tokens=40, max_tokens=32, local_context=1024, deadline_s=2.0, local_estimate_s=0.8)
    policy = hybrid.policy
    for _ in range(1000):
        policy.decide(signals)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(repeats // 20):
            policy.decide(signals)
        times.append((time.perf_counter() - start) / (repeats // 20))
    content = ["What is the capital of France? Answer in one short sentence, please."]
    full = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(200):
            policy.decide(hybrid.signals(40, 32, content, False, 2.0))
        full.append((time.perf_counter() - start) / 200)
    return {"decide_us": statistics.median(times) * 1e6, "signals_and_decide_us": statistics.median(full) * 1e6}


def measure_rates(llm) -> dict:
    from pydoc_data.topics import topics

    ids = llm.encode(topics["assert"], add_special_tokens=False)[:128]
    runs = [llm.generate(ids, max_tokens=32) for _ in range(3)]
    return {"prefill_tokens_per_second": statistics.median(r.timings.prefill_tokens_per_second for r in runs),
            "decode_tokens_per_second": statistics.median(r.timings.decode_tokens_per_second for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import httpx

    from edgec.models import llama
    from edgec.runtime.cloud import CloudModel
    from edgec.runtime.device import DeviceState
    from edgec.runtime.hybrid import HybridLLM
    from edgec.runtime.llm import LLM
    from edgec.runtime.policy import Policy

    tmp = Path(tempfile.mkdtemp(prefix="edgec-bench-hybrid-"))
    model_dir = llama.import_gguf(llama.smollm2_path(), tmp / "smollm2", weights="gguf-int4")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(model_dir), str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the cloud server did not start")
                time.sleep(0.2)
        local = LLM.from_dir(model_dir, context_length=1024)
        cloud = CloudModel(url, "cloud", context_length=2048, total_timeout=120, read_timeout=60)
        rates = measure_rates(local)
        hybrid = HybridLLM(local=local, cloud=cloud, rates=rates, device=lambda: DeviceState(),
                           policy=Policy.from_dict({"route": {"default": "local-then-cloud"}}))
        requests = workload(local)
        n = args.max_tokens

        def all_local(r):
            return local.chat(r["messages"], max_tokens=n, truncate="left")

        def all_cloud(r):
            return cloud.chat(r["messages"], max_tokens=n)

        def routed(r):
            return hybrid.chat(r["messages"], max_tokens=n, deadline_s=r.get("deadline_s"))

        sides = {"all-local": all_local, "all-cloud": all_cloud, "routed": routed}
        for fn in sides.values():  # warm up both processes
            fn(requests[0])
        per_request = {name: [[] for _ in requests] for name in sides}
        routes: list[str] = []
        for round_ in range(args.rounds):
            order = list(sides)[round_ % 3:] + list(sides)[: round_ % 3]
            for i, request in enumerate(requests):
                for name in order:
                    start = time.perf_counter()
                    done = sides[name](request)
                    per_request[name][i].append(time.perf_counter() - start)
                    if name == "routed" and round_ == 0:
                        routes.append(done.route)
        totals = {name: sum(statistics.median(t) for t in times) for name, times in per_request.items()}
        result = {
            "machine": "2-core AMD EPYC VM shared with other jobs; device and 'cloud' share the CPU",
            "rates": rates, **routing_overhead(hybrid),
            "requests": len(requests), "max_tokens": n, "rounds": args.rounds, "routes": routes,
            "share_local": sum(r == "local" for r in routes) / len(routes),
            "share_touching_cloud": sum(r != "local" for r in routes) / len(routes),
            "workload_seconds": totals,
            "routed_vs_all_local": totals["routed"] / totals["all-local"],
            "routed_vs_all_cloud": totals["routed"] / totals["all-cloud"],
        }
        hybrid.close()
    finally:
        server.terminate()
        server.wait(15)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"routing overhead: decide {result['decide_us']:.1f} us, signals + decide {result['signals_and_decide_us']:.1f} us")
    print(f"routes: {', '.join(routes)}")
    print(f"answered entirely on the device: {result['share_local']:.0%}")
    for name, seconds in totals.items():
        print(f"  {name:10s} workload {seconds:.2f} s (sum of per-request medians over {args.rounds} rounds)")
    print(f"routed / all-local {result['routed_vs_all_local']:.2f}   routed / all-cloud {result['routed_vs_all_cloud']:.2f}")


if __name__ == "__main__":
    main()
