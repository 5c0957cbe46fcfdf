"""The compile flow: frontend -> passes -> placement -> lowering -> verification -> bundle."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

import onnxruntime as ort

from edgec import bundle as _bundle
from edgec import targets as _targets
from edgec.compiler import frontend, samples, verify
from edgec.compiler.passes import build
from edgec.compiler.pipeline import run_pipeline
from edgec.compiler.quantize import QuantOptions
from edgec.compiler.quantize import quantize as quantize_model
from edgec.errors import ShapeError
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
    source_path = Path(model)
    output = Path(output) if output else Path(f"{source_path.stem}.edgec")
    passes = build(tgt.passes, disable_passes)
    with _bundle.BundleWriter(output, force=force) as writer:  # refuses an existing output up front
        step("reading model")
        fe = frontend.load(source_path, input_shapes)
        inputs = frontend.signature(fe.model.graph.inputs)
        calib_options = samples.CalibOptions.of(calib_options, model=source_path, metadata=fe.source.metadata, shapes=sample_shapes)
        if not tgt.allows_dynamic_shapes and samples.dynamic_inputs(inputs):
            name = samples.dynamic_inputs(inputs)[0]
            raise ShapeError(f"target {tgt.name} needs static shapes; input {name!r} is dynamic: pass --input-shape {name}=...")
        stats = run_pipeline(fe.model, passes, check_each_pass=check_each_pass, progress=lambda n: step(f"pass {n}"))
        model, quant_report = fe.model, None
        classes = verify.class_score_outputs(fe.model)
        if quantize is not None:
            real = calib is not None
            feed = (lambda: samples.read_calib(calib, inputs, limit=calib_samples, options=calib_options)) if real else None
            model, quant_report = quantize_model(fe.model, quantize, feed, real, progress=step)
        step(f"lowering for {tgt.name}")
        lowered = tgt.lower(model, writer.dir, {"quantization": quant_report})
        placement = tgt.placement(model)  # of the lowered graph: what will really run
        step("verifying against the source model")
        report = _verify(source_path, writer.dir / lowered.artifact, lowered.runtime, inputs, sample_shapes, calib, calib_options,
                         samples_count, tolerance, classes)
        reports = writer.dir / "reports"
        reports.mkdir()
        (reports / "placement.json").write_text(json.dumps([p.to_json() for p in placement], indent=1) + "\n")
        manifest = {
            "name": output.name.removesuffix(".zip").removesuffix(".edgec"),
            "target": tgt.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": vars(fe.source) | {"path": source_path.name},
            "artifact": lowered.artifact,
            "inputs": inputs,
            "outputs": frontend.signature(model.graph.outputs),
            "opset": model.opset_imports.get("", frontend.INTERNAL_OPSET),
            "passes": [s.to_json() for s in stats],
            "quantization": quant_report,
            "verification": report,
            "placement": _placement_summary(placement),
            "runtime": lowered.runtime,
            "requirements": {"onnxruntime": f">={ort.__version__}", "onnx_opset": model.opset_imports.get("", frontend.INTERNAL_OPSET)},
            "tools": tool_versions(),
            "notes": lowered.notes,
        }
        step("writing bundle")
        writer.commit(manifest)
    return _bundle.open_bundle(output)


def _verify(source, artifact, runtime, inputs, sample_shapes, calib, calib_options, count, tolerance, classes) -> dict:
    settings = {k: v for k, v in runtime.items() if k != "backend"}
    src = ort_backend.create_session(source, ort_backend.DEFAULT_SETTINGS, cache=False)
    art = ort_backend.create_session(artifact, settings, cache=False)
    if calib is not None:
        data, feeds = f"calib:{Path(calib).name}", samples.read_calib(calib, inputs, limit=count, options=calib_options)
    else:
        signature = samples.with_shapes(inputs, sample_shapes or {})
        data, feeds = "generated", samples.generate(signature, count)
    return verify.compare(
        lambda f: ort_backend.run(src, f), lambda f: ort_backend.run(art, f), feeds, tolerance=tolerance, data=data,
        class_scores=classes,
    )


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
