"""`make demo`: compile the real PP-OCRv4 detector and recognizer for this CPU, read a real page with them.

1. Cut real calibration inputs from scikit-image's scanned `page.png` with the source models.
2. `edgec compile` both models for the `cpu` target, verified on those real inputs.
3. Read the page with the bundles and with onnxruntime on the source models, side by side.
4. Benchmark each bundle against its source model (same process, interleaved runs).
5. Compile SmolLM2-135M-Instruct from its GGUF and answer one chat turn locally.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import edgec
from edgec.models import catalogue, ocr
from edgec.runtime import ort as ort_backend
from edgec.runtime.bench import bench_bundle

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
console = Console()


def read_page(det_run, rec_run, chars, page) -> list[tuple[str, float]]:
    x, scale = ocr.det_preprocess(page)
    boxes = ocr.text_boxes(det_run({"x": x}), scale)
    lines = []
    for y0, x0, y1, x1 in boxes:
        text, conf = ocr.ctc_decode(rec_run({"x": ocr.rec_preprocess(page[y0:y1, x0:x1])}), chars)
        lines.append((text, conf))
    return lines


def main() -> None:
    OUT.mkdir(exist_ok=True)
    det_src, rec_src = catalogue.model_path("ocr-det"), catalogue.model_path("ocr-rec")
    page = catalogue.image("page")
    console.rule("[bold]edgec demo: PP-OCRv4 on this CPU")
    console.print(f"models: {det_src.name}, {rec_src.name}  (from rapidocr-onnxruntime)")
    console.print(f"image:  scikit-image page.png {page.shape}")

    # Real calibration data: the page itself for the detector, its text lines for the recognizer.
    det_s = ort_backend.create_session(det_src, ort_backend.DEFAULT_SETTINGS, cache=False)
    x, scale = ocr.det_preprocess(page)
    (OUT / "calib-det").mkdir(exist_ok=True)
    np.savez(OUT / "calib-det" / "page.npz", x=x)
    boxes = ocr.text_boxes(det_s.run(None, {"x": x})[0], scale)
    (OUT / "calib-rec").mkdir(exist_ok=True)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        np.savez(OUT / "calib-rec" / f"line{i:02d}.npz", x=ocr.rec_preprocess(page[y0:y1, x0:x1]))

    bundles = {}
    for name, src in (("det", det_src), ("rec", rec_src)):
        with console.status(f"compiling {src.name} for cpu"):
            b = edgec.compile(src, "cpu", OUT / f"{name}.edgec", calib=OUT / f"calib-{name}", samples_count=16, force=True)
        v = b.manifest["verification"]
        worst = v["outputs"][v["worst_output"]]
        size = sum(f["size"] for f in b.manifest["files"].values())
        nodes = b.manifest["passes"][0]["nodes_before"], b.manifest["passes"][-1]["nodes_after"]
        console.print(
            f"[green]✓[/] {name}.edgec  {size / 1e6:.1f} MB  nodes {nodes[0]} → {nodes[1]}  verified on {v['samples']} real "
            f"inputs: max abs err {worst['max_abs']:.2e}, cosine {worst['cosine']:.6f}"
            + (f", top-1 agreement {worst['top1']:.4f}" if "top1" in worst else "")
        )
        bundles[name] = b.path
        b.close()

    det, rec = edgec.load(bundles["det"]), edgec.load(bundles["rec"])
    chars = ocr.charset(rec.metadata)
    rec_s = ort_backend.create_session(rec_src, ort_backend.DEFAULT_SETTINGS, cache=False)
    ours = read_page(lambda f: det.run(f)["sigmoid_0.tmp_0"], lambda f: rec.run(f)["softmax_11.tmp_0"], chars, page)
    theirs = read_page(lambda f: det_s.run(None, f)[0], lambda f: rec_s.run(None, f)[0], chars, page)
    table = Table("bundle reads", "conf", "source model reads", "same", title="page.png, line by line", title_justify="left")
    for (a, ca), (b, _) in zip(ours, theirs):
        table.add_row(escape(a), f"{ca:.2f}", escape(b), "✓" if a == b else "✗")
    console.print(table)
    same = sum(a == b for (a, _), (b, _) in zip(ours, theirs))
    console.print(f"{same}/{max(len(ours), len(theirs))} lines read identically")

    bench = Table("bundle", "p50 ms", "source p50 ms", "latency ratio", "load ms", "source load ms", title="latency vs onnxruntime on the source model (interleaved, same process)", title_justify="left")
    for name, src, feeds in (("det", det_src, {"x": x}), ("rec", rec_src, dict(np.load(OUT / "calib-rec" / "line00.npz")))):
        r = bench_bundle(bundles[name], src, feeds, repeats=20)
        bench.add_row(name, f"{r['bundle']['p50_ms']:.2f}", f"{r['baseline']['p50_ms']:.2f}", f"{r['latency_ratio']:.3f}",
                      f"{r['bundle']['load_ms']:.1f}", f"{r['baseline']['load_ms']:.1f}")
    console.print(bench)
    chat_locally()
    console.print(f"bundles in {OUT}/ — try: edgec inspect {bundles['rec']}, edgec chat {OUT / 'smollm2.edgec'}")


def chat_locally() -> None:
    """SmolLM2-135M-Instruct from its GGUF (4-bit blocks kept) to a bundle, then one chat turn."""
    from edgec.models.llama import smollm2_path

    console.rule("[bold]local chat: SmolLM2-135M-Instruct (GGUF Q4_1 → int4 cpu bundle)")
    with console.status("compiling the GGUF"):
        b = edgec.compile(smollm2_path(), "cpu", OUT / "smollm2.edgec", quantize="int4", force=True)
    v = b.manifest["verification"]
    console.print(f"[green]✓[/] smollm2.edgec  next-token agreement {v['outputs']['logits']['top1']:.3f}, perplexity on "
                  f"pydoc text {v['perplexity']['artifact']:.2f} (source {v['perplexity']['source']:.2f})")
    question = "What is the capital of France?"
    console.print(f"[bold]user:[/] {question}\n[bold]assistant:[/] ", end="")
    with edgec.load(b.path) as llm:
        last = None
        for last in llm.chat([{"role": "user", "content": question}], max_tokens=48, stream=True):
            console.print(escape(last.text), end="")
    t = last.timings
    console.print(f"\n[dim]time to first token {t.time_to_first_token * 1e3:.0f} ms, decode {t.decode_tokens_per_second:.0f} tok/s[/]")


if __name__ == "__main__":
    main()
