"""Benchmarks: a bundle against a baseline measured in the same run on the same machine.

Latency runs are interleaved (bundle, baseline, baseline, bundle, ...) so drift in clock speed
or background load hits both sides alike; figures are medians/p90 and the ratio bundle/baseline.
Peak RSS is measured in a fresh subprocess per side, since one process's peak mixes both.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgec.runtime import ort as ort_backend

Runner = Callable[[], object]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def interleaved(a: Runner, b: Runner, repeats: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` alternately (ABBA order); returns seconds per call for each."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(repeats):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, out in order:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return ta, tb


def median_time(fn: Runner, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_bundle(
    bundle_path: Path, baseline: Path | None, feeds: dict[str, np.ndarray], repeats: int = 30, loads: int = 5, threads: int = 0
) -> dict:
    """Latency p50/p90, load time and peak RSS of a bundle and, if given, of the baseline ONNX file.

    ``threads`` is ORT's intra-op thread count for both sides (0: ORT's default, one per core).
    """
    import edgec

    model = edgec.load(bundle_path, threads=threads)  # first load fills the optimized-graph cache
    first_load = model.load_seconds
    result: dict = {"bundle": str(bundle_path), "inputs": {k: list(v.shape) for k, v in feeds.items()}, "repeats": repeats, "threads": threads}
    bundle_load = median_time(lambda: edgec.load(bundle_path, threads=threads).close(), loads)
    run_bundle = lambda: model.run(feeds)  # noqa: E731
    sides = {"bundle": {"load_ms": bundle_load * 1e3, "first_load_ms": first_load * 1e3}}
    if baseline is not None:
        settings = {**ort_backend.DEFAULT_SETTINGS, "intra_op_num_threads": threads}
        base_load = median_time(lambda: ort_backend.create_session(baseline, settings, cache=False), loads)
        session = ort_backend.create_session(baseline, settings, cache=False)
        run_base = lambda: ort_backend.run(session, feeds)  # noqa: E731
        tb, tr = interleaved(run_bundle, run_base, repeats)
        sides["baseline"] = {"load_ms": base_load * 1e3}
        times = {"bundle": tb, "baseline": tr}
    else:
        times = {"bundle": [median_time(run_bundle, 1) for _ in range(repeats)]}
    for side, values in times.items():
        sides[side]["p50_ms"] = _percentile(values, 50) * 1e3
        sides[side]["p90_ms"] = _percentile(values, 90) * 1e3
    sides["bundle"]["peak_rss_mb"] = peak_rss_mb("bundle", bundle_path, feeds)
    if baseline is not None:
        sides["baseline"]["peak_rss_mb"] = peak_rss_mb("onnx", baseline, feeds)
        result["latency_ratio"] = sides["bundle"]["p50_ms"] / sides["baseline"]["p50_ms"]
        result["load_ratio"] = sides["bundle"]["load_ms"] / sides["baseline"]["load_ms"]
        result["baseline"] = str(baseline)
    result.update(sides)
    model.close()
    return result


def peak_rss_mb(kind: str, path: Path, feeds: dict[str, np.ndarray], runs: int = 3) -> float:
    """Peak resident memory of a fresh process that loads ``path`` and runs it ``runs`` times."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        out = subprocess.run(
            [sys.executable, "-m", "edgec.runtime.bench", kind, str(path), str(Path(tmp) / "feeds.npz"), str(runs)],
            capture_output=True, text=True, check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _child(kind: str, path: str, feeds_file: str, runs: int) -> None:
    feeds = dict(np.load(feeds_file))
    if kind == "bundle":
        import edgec

        run = edgec.load(path).run
    else:
        session = ort_backend.create_session(Path(path), ort_backend.DEFAULT_SETTINGS, cache=False)
        run = lambda f: ort_backend.run(session, f)  # noqa: E731
    for _ in range(runs):
        run(feeds)
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    # VmHWM starts afresh at exec; ru_maxrss on Linux keeps the forking parent's peak.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))


def bench_decoder(bundle_path: Path, prompt_tokens: int = 128, gen_tokens: int = 128, repeats: int = 3, threads: int = 0) -> dict:
    """Prefill and decode tokens/s, time to first token and peak RSS of a decoder bundle.

    The prompt is real text (``pydoc_data.topics``) cut to ``prompt_tokens``; decoding is greedy for
    ``gen_tokens``. Medians over ``repeats``. The rates are also stored on this device
    (``rates_file``) for routing policies that estimate local latency.
    """
    import edgec
    from pydoc_data.topics import topics

    llm = edgec.load(bundle_path, threads=threads or None)
    text = " ".join(topics[k] for k in sorted(topics))
    ids = llm.encode(text, add_special_tokens=False)[:prompt_tokens]
    runs = [llm.generate(ids, max_tokens=gen_tokens, temperature=0.0) for _ in range(repeats)]
    med = lambda key: statistics.median(getattr(r.timings, key) for r in runs)  # noqa: E731
    result = {
        "bundle": str(bundle_path),
        "threads": threads,
        "prompt_tokens": len(ids),
        "generated_tokens": statistics.median(r.completion_tokens for r in runs),
        "prefill_tokens_per_second": med("prefill_tokens_per_second"),
        "decode_tokens_per_second": med("decode_tokens_per_second"),
        "time_to_first_token_ms": med("time_to_first_token") * 1e3,
        "load_ms": llm.load_seconds * 1e3,
        "peak_rss_mb": _peak_rss_mb(),
    }
    manifest = json.loads((Path(bundle_path) / "manifest.json").read_text()) if Path(bundle_path).is_dir() else None
    if manifest is not None:
        store_rates(manifest["files"][manifest["artifact"]]["sha256"], result)
    llm.close()
    return result


def rates_file(artifact_sha256: str) -> Path:
    """Where this device keeps a bundle's measured generation rates."""
    return ort_backend.cache_dir() / "rates" / f"{artifact_sha256[:32]}.json"


def store_rates(artifact_sha256: str, result: dict) -> None:
    path = rates_file(artifact_sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: result[k] for k in ("prefill_tokens_per_second", "decode_tokens_per_second",
                                                      "time_to_first_token_ms", "prompt_tokens", "threads")}, indent=2))
    tmp.replace(path)
