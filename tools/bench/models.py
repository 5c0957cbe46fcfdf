"""Benchmark every real model's cpu bundle against onnxruntime on its source model (`make bench`).

For each model: compile (cached in bench-out/), then `bench_bundle` with ORT's default threads
and with one thread. Prints a Markdown table of p50 latency ratio, load ratio and peak RSS.
Ratios < 1 mean the bundle is faster / smaller. Usage: python tools/bench/models.py [--repeats N]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np

import edgec
from edgec.models import catalogue, ocr
from edgec.runtime.bench import bench_bundle

OUT = Path("bench-out")


def _inputs() -> dict[str, dict[str, np.ndarray]]:
    page = catalogue.image("page")
    det_x, _ = ocr.det_preprocess(page)
    rng = np.random.default_rng(0)
    audio = {"input": rng.standard_normal((1, 512)).astype(np.float32) * 0.1,
             "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000)}
    return {
        "ocr-det": {"x": det_x},
        "ocr-rec": {"x": ocr.rec_preprocess(page[:40, :300])},
        "ocr-cls": {"x": rng.uniform(-1, 1, (6, 3, 48, 192)).astype(np.float32)},
        "silero-vad": audio,
        "silero-vad-16k": audio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} cores, "
          f"onnxruntime {__import__('onnxruntime').__version__}; repeats {args.repeats}, interleaved; ratio = bundle / source\n")
    print("| model | input | threads | bundle p50 ms | source p50 ms | latency ratio | load ratio | bundle RSS MB | source RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, feeds in _inputs().items():
        if args.models and name not in args.models:
            continue
        src = catalogue.model_path(name)
        bundle = OUT / f"{name}.edgec"
        calib = OUT / f"{name}.npz"
        np.savez(calib, **feeds)
        edgec.compile(src, "cpu", bundle, calib=calib, force=True).close()
        shape = "x".join(str(d) for d in next(iter(feeds.values())).shape)
        for threads in (0, 1):
            r = bench_bundle(bundle, src, feeds, repeats=args.repeats, threads=threads)
            b, s = r["bundle"], r["baseline"]
            print(f"| {name} | {shape} | {threads or 'default'} | {b['p50_ms']:.2f} | {s['p50_ms']:.2f} | "
                  f"{r['latency_ratio']:.3f} | {r['load_ratio']:.3f} | {b['peak_rss_mb']:.0f} | {s['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
