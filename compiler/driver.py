"""The compile flow: frontend -> passes -> placement -> lowering -> verification -> bundle."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgec import bundle as _bundle
from edgec import targets as _targets
from edgec.compiler import decoder, frontend, samples, verify
from edgec.compiler.passes import build
from edgec.compiler.pipeline import run_pipeline
from edgec.compiler.quantize import QuantOptions
from edgec.compiler.quantize import quantize as quantize_model
from edgec.errors import InputError, ShapeError
from edgec.runtime import ort as ort_backend

Progress = Callable[[str], None]


def compile_model(
    model: str | os.PathLike,
    target: str = "cpu",
    output: str | os.PathLike | None = None,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    sample_shapes: dict[str, list[int]] | None = None,
    calib: str | os.PathLike | None = None,
    calib_options: samples.CalibOptions | dict | None = None,
    samples_count: int = 4,
    tolerance: float | None = None,
    quantize: QuantOptions | str | None = None,
    calib_samples: int = 64,
    disable_passes: list[str] | tuple[str, ...] = (),
    check_each_pass: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> _bundle.Bundle:
    """Compile ``model`` (an ONNX file) for ``target`` into a verified bundle at ``output``.

    ``output`` defaults to ``NAME.edgec`` in the current folder; a name ending in ``.zip`` writes
    the single-file form. Nothing is written unless lowering and verification both succeed.
    ``tolerance`` (relative error vs the source) defaults to 1e-3 for float bundles. ``quantize``
    is a mode name or a ``QuantOptions``; a quantized bundle is held to ``tolerance`` only when one
    is given (quantization changes outputs by design; its budget is ``max_accuracy_drop``).
    ``calib_options`` (a ``samples.CalibOptions`` or a dict of its fields) turns ``calib`` images or text into tensors.
    """
    if isinstance(quantize, str):
        quantize = QuantOptions(mode=quantize)
    if quantize is not None:
        quantize.check()
    elif tolerance is None:
        tolerance = verify.DEFAULT_TOLERANCE
    step = progress or (lambda _: None)
    tgt = _targets.get(target)
    given = Path(model)
    output = Path(output) if output else Path(f"{given.stem}.edgec")
    passes = build(tgt.passes, disable_passes)
    with _bundle.BundleWriter(output, force=force) as writer:  # refuses an existing output up front
        step("reading model")
        src = decoder.resolve(given, quantize.mode if quantize else None)
        try:
            manifest = _compile(src, given, output, tgt, passes, writer.dir, step, input_shapes, sample_shapes, calib,
                                calib_options, samples_count, tolerance, quantize, calib_samples, check_each_pass)
        finally:
            src.close()
        step("writing bundle")
        writer.commit(manifest)
    return _bundle.open_bundle(output)


def _compile(src, given, output, tgt, passes, out_dir, step, input_shapes, sample_shapes, calib, calib_options,
             samples_count, tolerance, quantize, calib_samples, check_each_pass) -> dict:
    """Every step between reading the source and writing the manifest; files go into ``out_dir``."""
    fe = frontend.load(src.onnx, input_shapes)
    inputs = frontend.signature(fe.model.graph.inputs)
    is_decoder = decoder.is_decoder(inputs)
    calib_options = samples.CalibOptions.of(calib_options, model=src.onnx, metadata=fe.source.metadata, shapes=sample_shapes)
    if not tgt.allows_dynamic_shapes and samples.dynamic_inputs(inputs):
        name = samples.dynamic_inputs(inputs)[0]
        raise ShapeError(f"target {tgt.name} needs static shapes; input {name!r} is dynamic: pass --input-shape {name}=...")
    stats = run_pipeline(fe.model, passes, check_each_pass=check_each_pass, progress=lambda n: step(f"pass {n}"))
    model, quant_report = fe.model, None
    classes = verify.class_score_outputs(fe.model)
    if quantize is not None and src.gguf_weights == "gguf-int4" and quantize.mode == "int4":
        quant_report = _gguf_blocks_report(fe.model, quantize)  # the GGUF's blocks are already int4: nothing to redo
    elif quantize is not None:
        real = calib is not None
        feed = (lambda: samples.read_calib(calib, inputs, limit=calib_samples, options=calib_options)) if real else None
        model, quant_report = quantize_model(fe.model, quantize, feed, real, progress=step)
    step(f"lowering for {tgt.name}")
    lowered = tgt.lower(model, out_dir, {"quantization": quant_report})
    placement = tgt.placement(model)  # of the lowered graph: what will really run
    for sidecar in src.sidecars:
        shutil.copyfile(sidecar, out_dir / sidecar.name)
    step("verifying against the source model")
    if is_decoder and calib is None:
        tokenizer = next((p for p in src.sidecars if p.name == "tokenizer.json"), None)
        if tokenizer is None:
            raise InputError(f"{given}: a decoder needs tokenizer.json beside model.onnx to be verified on real text (or give --calib)")
        feeds, data = list(decoder.text_samples(inputs, tokenizer, samples_count)), "text:pydoc_data.topics"
    elif calib is not None:
        feeds, data = samples.read_calib(calib, inputs, limit=samples_count, options=calib_options), f"calib:{Path(calib).name}"
    else:
        feeds, data = samples.generate(samples.with_shapes(inputs, sample_shapes or {}), samples_count), "generated"
    report = _verify(src.reference or src.onnx, out_dir / lowered.artifact, lowered.runtime, feeds, data, tolerance, classes,
                     is_decoder)
    if src.reference is not None:
        report["reference"] = "float32 import of the same GGUF weights"
    (out_dir / "reports").mkdir()
    (out_dir / "reports" / "placement.json").write_text(json.dumps([p.to_json() for p in placement], indent=1) + "\n")
    opset = model.opset_imports.get("", frontend.INTERNAL_OPSET)
    return {
        "name": output.name.removesuffix(".zip").removesuffix(".edgec"),
        "kind": "decoder" if is_decoder else "model",
        "target": tgt.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": vars(fe.source) | {"path": given.name} | _gguf_source(given, src),
        "artifact": lowered.artifact,
        "inputs": inputs,
        "outputs": frontend.signature(model.graph.outputs),
        "opset": opset,
        "passes": [s.to_json() for s in stats],
        "quantization": quant_report,
        "verification": report,
        "placement": _placement_summary(placement),
        "runtime": lowered.runtime,
        "requirements": {"onnxruntime": f">={ort.__version__}", "onnx_opset": opset},
        "tools": tool_versions(),
        "notes": lowered.notes,
    }


def _gguf_source(given: Path, src) -> dict:
    """A GGUF's own hash and size: the ONNX compiled was only its temporary import."""
    if given.suffix != ".gguf":
        return {}
    return {"sha256": _bundle.sha256_file(given), "size": given.stat().st_size, "imported": f"gguf, weights {src.gguf_weights}"}


def _gguf_blocks_report(model, options: QuantOptions) -> dict:
    from edgec.compiler.pipeline import weight_bytes

    return {
        "mode": "int4",
        "weights": "the GGUF's own blocks, kept exactly (Q4_0 -> int4 QDQ, Q4_1 -> uint4 QDQ + block offsets, Q8_0 -> int8 QDQ)",
        "activations": "float",
        "int4_accuracy": options.int4_accuracy,
        "calibration": None,
        "weight_bytes_before": None,
        "weight_bytes_after": weight_bytes(model),
        "accuracy": None,
        "budget_search": None,
        "layers": [],
    }


def _verify(source, artifact, runtime, feeds, data, tolerance, classes, is_decoder) -> dict:
    settings = {k: v for k, v in runtime.items() if k != "backend"}
    src = ort_backend.create_session(source, ort_backend.DEFAULT_SETTINGS, cache=False)
    art = ort_backend.create_session(artifact, settings, cache=False)
    report = verify.compare(
        lambda f: ort_backend.run(src, f), lambda f: ort_backend.run(art, f), feeds, tolerance=tolerance, data=data,
        class_scores=classes,
    )
    if is_decoder and isinstance(feeds, list):  # perplexity on the same real text, source vs artifact
        ppl = {"source": [], "artifact": []}
        for f in feeds:
            ppl["source"].append(decoder.perplexity(ort_backend.run(src, f)["logits"], f["input_ids"]))
            ppl["artifact"].append(decoder.perplexity(ort_backend.run(art, f)["logits"], f["input_ids"]))
        report["perplexity"] = {k: float(np.mean(v)) for k, v in ppl.items()}
    return report


def _placement_summary(placement) -> dict:
    devices: dict[str, int] = {}
    for p in placement:
        devices[p.device] = devices.get(p.device, 0) + 1
    return {"devices": devices, "fallbacks": [p.to_json() for p in placement if p.device not in ("cpu",)][:50]}


def tool_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("edgec", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
