"""Quantized bundles against the fp32 bundle and onnxruntime's own quantizer, accuracy side by side.

For MiniLM (sentence embeddings), the PP-OCRv4 recognizer (text crops from page.png) and the
digits CNN: edgec's int8 bundle(s), ORT `quantize_dynamic` / `quantize_static` with their defaults
on the same source model and calibration data, and the fp32 bundle they are all timed against
(interleaved, same process). Prints a Markdown table. Usage:
    python tools/bench/quantize.py [--threads N] [--repeats N] [--models minilm rec digits]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

import edgec
from edgec.compiler.quantize import QuantOptions
from edgec.models import catalogue, digits, minilm, ocr
from edgec.runtime import ort as ort_backend
from edgec.runtime.bench import interleaved

OUT = Path("bench-out/quantize")


class _Reader(CalibrationDataReader):
    def __init__(self, samples: list[dict]) -> None:
        self.it = iter(samples)

    def get_next(self):
        return next(self.it, None)


def _write_calib(name: str, samples: list[dict]) -> Path:
    folder = OUT / f"calib-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        np.savez(folder / f"{i:03d}.npz", **s)
    return folder


def minilm_case():
    src = minilm.build_to(OUT / "minilm")
    ref = np.load(Path(__file__).parents[2] / "tests" / "fixtures" / "minilm_reference.npz")
    tok = minilm.load_tokenizer()
    passages = [str(t) for t in ref["passages"]]
    calib = [minilm.encode([t], tok) for t in passages + [str(q) for q in ref["queries"]]]
    feeds = minilm.encode(passages, tok)

    def accuracy(run):
        emb = run(feeds)["sentence_embedding"]
        return f"min cosine {float((emb * ref['passage_embeddings']).sum(1).min()):.4f}"

    variants = {
        "edgec int8-dynamic": QuantOptions("int8-dynamic"),
        "edgec int8-dynamic, float embedding tables": QuantOptions("int8-dynamic", precision=(("Gather", "float"),)),
        "edgec int8 (0.5% budget)": QuantOptions("int8", calibration="percentile", max_accuracy_drop=0.005),
        "edgec int4 (hqq, block 32)": QuantOptions("int4", int4_method="hqq"),
        "edgec int4 → int8 per layer (1% budget)": QuantOptions("int4", max_accuracy_drop=0.01),
    }
    return "MiniLM-L6 (8×256 tokens)", src, calib, feeds, accuracy, variants


def rec_case():
    src = catalogue.model_path("ocr-rec")
    det = ort_backend.create_session(catalogue.model_path("ocr-det"), ort_backend.DEFAULT_SETTINGS, cache=False)
    page = catalogue.image("page")
    lines = [c for _, c in ocr.line_crops(page, lambda x: det.run(None, {"x": x})[0])]
    words = [w for line in lines for w in ocr.word_crops(line)]
    calib = [{"x": ocr.rec_preprocess(c)} for c in lines + words[0::2]]
    held_out = [{"x": ocr.rec_preprocess(c)} for c in words[1::2]]
    chars = ocr.charset(onnx.load(src))
    fp32 = ort_backend.create_session(src, ort_backend.DEFAULT_SETTINGS, cache=False)
    expected = [ocr.ctc_decode(fp32.run(None, s)[0], chars)[0] for s in held_out]

    def accuracy(run):
        got = [ocr.ctc_decode(next(iter(run(s).values())), chars)[0] for s in held_out]
        return f"{sum(a == b for a, b in zip(got, expected))}/{len(expected)} held-out words read as fp32"

    variants = {
        "edgec int8 (minmax)": QuantOptions("int8"),
        "edgec int8 (percentile)": QuantOptions("int8", calibration="percentile"),
        "edgec int8 (same-text budget)": QuantOptions("int8", max_accuracy_drop=0.0, metric=_same_text(calib, chars, fp32)),
    }
    return "PP-OCRv4 rec (1×3×48×320)", src, calib, {"x": ocr.rec_preprocess(lines[1])}, accuracy, variants


def _same_text(calib, chars, fp32):
    reference = [ocr.ctc_decode(fp32.run(None, s)[0], chars)[0] for s in calib]

    def same_text(outputs):
        return float(np.mean([ocr.ctc_decode(next(iter(o.values())), chars)[0] == r for o, r in zip(outputs, reference)]))

    return same_text


def digits_case():
    x_train, _, x_test, y_test = digits.load_split()
    calib = [{"image": x_train[i * 16:(i + 1) * 16]} for i in range(16)]

    def accuracy(run):
        return f"test accuracy {float((run({'image': x_test})['logits'].argmax(1) == y_test).mean()):.4f}"

    return "digits CNN (batch 360)", digits.model_path(), calib, {"image": x_test}, accuracy, {"edgec int8": QuantOptions("int8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=["minilm", "rec", "digits"])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    settings = {**ort_backend.DEFAULT_SETTINGS, "intra_op_num_threads": args.threads}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; threads {args.threads}; repeats {args.repeats}, interleaved "
          "against the fp32 bundle; latency ratio < 1 is faster, size = artifact bytes / fp32 artifact bytes\n")
    print("| model | variant | accuracy | size ratio | latency ratio vs fp32 |")
    print("|---|---|---|---|---|")
    cases = {"minilm": minilm_case, "rec": rec_case, "digits": digits_case}
    for key in args.models:
        title, src, calib, feeds, accuracy, variants = cases[key]()
        folder = _write_calib(key, calib)
        fp32_bundle = edgec.compile(src, "cpu", OUT / f"{key}-fp32.edgec", calib=folder, force=True)
        base_size = (fp32_bundle.path / "model.onnx").stat().st_size
        base = ort_backend.create_session(fp32_bundle.path / "model.onnx", settings, cache=False)
        run_base = lambda f: ort_backend.run(base, f)  # noqa: E731
        print(f"| {title} | fp32 bundle | {accuracy(run_base)} | 1.00 | 1.00 |", flush=True)
        candidates = {}
        for name, options in variants.items():
            slug = "".join(c if c.isalnum() else "-" for c in name.lower())
            b = edgec.compile(src, "cpu", OUT / f"{key}-{slug}.edgec", calib=folder, quantize=options, force=True)
            candidates[name] = b.path / "model.onnx"
        for name, quantize in (
            ("ORT quantize_dynamic (defaults)", lambda out: quantize_dynamic(str(src), str(out))),
            # edgec's int8-dynamic choices in ORT's quantizer: per-channel weights, weight MatMuls only
            ("ORT quantize_dynamic (per-channel, weight MatMuls only)", lambda out: quantize_dynamic(
                str(src), str(out), per_channel=True, extra_options={"MatMulConstBOnly": True})),
            ("ORT quantize_static (defaults, QDQ)", lambda out: quantize_static(str(src), str(out), _Reader(calib), quant_format=QuantFormat.QDQ)),
        ):
            out = OUT / f"{key}-ort-{name.split()[2]}{'-weights' if 'weight' in name else ''}.onnx"
            try:
                quantize(out)
                candidates[name] = out
            except Exception as exc:  # ORT's quantizer raises plain ValueErrors etc.; the failure is the result
                print(f"| | {name} | fails: {str(exc).splitlines()[0][:80]} | - | - |", flush=True)
        for name, path in candidates.items():
            session = ort_backend.create_session(path, settings, cache=False)
            run = lambda f, s=session: ort_backend.run(s, f)  # noqa: E731
            a, b = interleaved(lambda: run(feeds), lambda: run_base(feeds), args.repeats)
            print(f"| | {name} | {accuracy(run)} | {path.stat().st_size / base_size:.2f} | {np.median(a) / np.median(b):.3f} |", flush=True)


if __name__ == "__main__":
    main()
