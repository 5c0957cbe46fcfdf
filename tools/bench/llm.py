"""SmolLM2-135M-Instruct: edgec's float and int4 bundles against llama.cpp on the very same GGUF.

Prefill and decode tokens/s, time to first token, peak RSS per side in a fresh process. Greedy, same
prompt token ids (real text from pydoc_data.topics), same number of tokens, same threads.
llama.cpp runs only when llama-cpp-python is installed (`pip install llama-cpp-python` compiles it).
The sides take turns, one fresh process each per round (a warm-up generation, then a measured one),
so load on a shared machine hits them alike; figures are medians over rounds, ratios are per round.
Usage: python tools/bench/llm.py [--prompt-tokens 128] [--gen-tokens 128] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("bench-out/llm")


def _edgec(bundle: Path, ids: list[int], gen: int, threads: int, repeats: int) -> dict:
    import edgec
    from edgec.runtime.bench import _peak_rss_mb

    llm = edgec.load(bundle, threads=threads)
    runs = [llm.generate(ids, max_tokens=gen) for _ in range(repeats + 1)][1:]  # first run warms up
    med = lambda k: statistics.median(getattr(r.timings, k) for r in runs)  # noqa: E731
    return {"prefill": med("prefill_tokens_per_second"), "decode": med("decode_tokens_per_second"),
            "ttft_ms": med("time_to_first_token") * 1e3, "rss_mb": _peak_rss_mb(), "tokens": runs[0].tokens}


def _llama_cpp(gguf: Path, ids: list[int], gen: int, threads: int, repeats: int) -> dict:
    import llama_cpp
    import numpy as np

    from edgec.runtime.bench import _peak_rss_mb

    m = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_ctx=len(ids) + gen + 16, n_batch=512, verbose=False)
    vocab = m.n_vocab()
    results = []
    for _ in range(repeats + 1):
        m.reset()
        start = time.perf_counter()
        m.eval(ids)
        prefill = time.perf_counter() - start
        argmax = lambda: int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m.ctx, -1), shape=(vocab,)).argmax())  # noqa: E731
        tokens = [argmax()]
        ttft = time.perf_counter() - start
        t1 = time.perf_counter()
        while len(tokens) < gen:
            m.eval([tokens[-1]])
            tokens.append(argmax())
        results.append((len(ids) / prefill, (gen - 1) / (time.perf_counter() - t1), ttft * 1e3, tokens))
    results = results[1:]
    return {"prefill": statistics.median(r[0] for r in results), "decode": statistics.median(r[1] for r in results),
            "ttft_ms": statistics.median(r[2] for r in results), "rss_mb": _peak_rss_mb(), "tokens": results[0][3]}


def _child() -> None:
    kind, path, ids_file, gen, threads, repeats = sys.argv[2:8]
    ids = json.loads(Path(ids_file).read_text())
    side = _edgec if kind == "edgec" else _llama_cpp
    print(json.dumps(side(Path(path), ids, int(gen), int(threads), int(repeats))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import edgec
    from pydoc_data.topics import topics

    from edgec.models.llama import smollm2_path

    gguf = smollm2_path()
    OUT.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for name, quantize in (("float", None), ("int4", "int4")):
        bundles[name] = OUT / f"smollm2-{name}.edgec"
        if not bundles[name].exists():
            edgec.compile(gguf, "cpu", bundles[name], quantize=quantize).close()
    with edgec.load(bundles["int4"]) as llm:
        ids = llm.encode(" ".join(topics[k] for k in ("assignment", "for", "exceptions")), add_special_tokens=False)[:args.prompt_tokens]
    ids_file = OUT / "ids.json"
    ids_file.write_text(json.dumps(ids))
    sides = {f"edgec {n}": ("edgec", bundles[n]) for n in bundles}
    try:
        import llama_cpp  # noqa: F401

        sides["llama.cpp Q4_1"] = ("llama", gguf)
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp is left out\n")
    weight_mb = {name: sum(f.stat().st_size for f in b.glob("model.onnx*")) / 1e6 for name, b in bundles.items()}
    runs = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (kind, path) in sides.items():
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(ids_file), str(args.gen_tokens),
                                  str(args.threads), "1"], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"SmolLM2-135M-Instruct; prompt {len(ids)} tokens, {args.gen_tokens} generated, greedy, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds; {os.cpu_count()} cores; each side in its own process\n")
    base = "llama.cpp Q4_1" if "llama.cpp Q4_1" in runs else None
    ratio = lambda name, key: statistics.median(r[key] / b[key] for r, b in zip(runs[name], runs[base]))  # noqa: E731
    print("| side | prefill tok/s | decode tok/s | time to first token ms | peak RSS MB | same tokens as edgec float |"
          + (" prefill / llama.cpp | decode / llama.cpp |" if base else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if base else ""))
    reference = runs["edgec float"][0]["tokens"]
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("prefill", "decode", "ttft_ms", "rss_mb")}
        tokens = rs[0]["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
        print(f"| {name} | {med['prefill']:.0f} | {med['decode']:.1f} | {med['ttft_ms']:.0f} | {med['rss_mb']:.0f} "
              f"| first {same}/{len(tokens)} |" + (f" {ratio(name, 'prefill'):.2f} | {ratio(name, 'decode'):.2f} |" if base else ""))
    print(f"\nweights on disk: float {weight_mb['float']:.0f} MB, int4 {weight_mb['int4']:.0f} MB")


if __name__ == "__main__":
    _child() if len(sys.argv) > 1 and sys.argv[1] == "--child" else main()
