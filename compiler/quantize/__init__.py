"""Target-neutral quantization into QDQ form, under an optional accuracy budget.

Modes:
  int8          static: int8 per-channel weights + uint8 per-tensor activations (needs --calib)
  int8-dynamic  int8 per-column MatMul weights; activations quantized per call by the backend
  int4          block-wise int4 MatMul weights (RTN or HQQ), activations float
  fp16          float16 weights and compute; float32 kept where float16 overflows or loses accuracy
                (op rules, and with --calib the calibrated ranges: see ``fp16``)
Every mode keeps the layers named in ``keep_float`` in float, and with ``max_accuracy_drop`` also
the most sensitive layers until the drop against the float model fits (see ``budget``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from edgec.compiler import verify
from edgec.compiler.pipeline import weight_bytes
from edgec.compiler.quantize import accuracy, budget, calibrate, fp16, int8
from edgec.errors import CalibrationError, InputError
from edgec.runtime import ort as ort_backend

MODES = ("int8", "int8-dynamic", "int4", "fp16")
#: samples held in memory to measure accuracy (their float outputs are kept as the reference)
EVAL_SAMPLES = 32

Samples = Callable[[], Iterator[dict[str, np.ndarray]]]


@dataclass
class QuantOptions:
    mode: str
    calibration: str = "minmax"
    percentile: float = 99.999
    block_size: int = 32
    symmetric: bool = True
    int4_method: str = "rtn"
    #: "fast": the backend may quantize activations inside int4 kernels (ORT MatMulNBits accuracy level 4);
    #: "exact": float accumulation, the same numbers as the QDQ graph (about 10x slower decode on x86 ORT)
    int4_accuracy: str = "fast"
    max_accuracy_drop: float | None = None
    keep_float: tuple[str, ...] = ()
    metric: accuracy.TaskMetric | None = field(default=None, repr=False)

    def check(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown --quantize mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.calibration not in calibrate.METHODS:
            raise InputError(f"unknown --calibration {self.calibration!r}; choose one of {', '.join(calibrate.METHODS)}")
        if self.int4_accuracy not in ("fast", "exact"):
            raise InputError(f"--int4-accuracy {self.int4_accuracy!r}: choose fast or exact")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise InputError(f"--block-size {self.block_size}: use 16, 32, 64, 128 or 256")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 1:
            raise InputError(f"--max-accuracy-drop {self.max_accuracy_drop}: give a fraction like 0.005 or a percentage like 0.5%")


def layers_for(model: ir.Model, mode: str) -> list[ir.Node]:
    if mode == "fp16":  # every node computing in float is converted or kept, so each can be named
        return fp16.float_nodes(model)
    return int8.quantizable_layers(model, {"int8": int8.STATIC_OPS, "int8-dynamic": ("MatMul",), "int4": ("MatMul", "Gemm")}[mode])


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def quantize(
    model: ir.Model, options: QuantOptions, samples: Samples | None, has_real_data: bool,
    progress: Callable[[str], None] | None = None,
) -> tuple[ir.Model, dict]:
    """Quantize ``model`` (float, after the passes); returns the QDQ model and the manifest report."""
    options.check()
    say = progress or (lambda _: None)
    common.NameFixPass()(model)  # layers are named in reports, --keep-float and the budget search
    classes = verify.class_score_outputs(model)
    layers = layers_for(model, options.mode)
    names = [n.name for n in layers]
    unknown = [n for n in options.keep_float if n not in names]
    if unknown:
        raise InputError(f"--keep-float {unknown[0]!r}: not a quantizable layer; they are: {', '.join(names[:20])}"
                         + (" ..." if len(names) > 20 else ""))
    if (options.mode == "int8" or options.max_accuracy_drop is not None) and not has_real_data:
        need = "int8 static quantization" if options.mode == "int8" else "--max-accuracy-drop"
        raise CalibrationError(f"{need} needs real inputs: give --calib (a .npz or a folder of them)")

    ranges = None
    if options.mode == "int8":
        ranges = calibrate.collect_ranges(
            model, samples(), options.calibration, options.percentile, progress=lambda n: say(f"calibrating: {n} samples")
        )
    elif options.mode == "fp16" and has_real_data:
        # minmax whatever --calibration says: the outliers percentile/entropy clip are what overflows float16
        ranges = calibrate.collect_ranges(model, samples(), "minmax", progress=lambda n: say(f"calibrating: {n} samples"))
    fp16_report: dict = {}

    def build(kept: frozenset[str]) -> ir.Model:
        exclude = set(kept) | set(options.keep_float)
        if options.mode == "int8":
            return int8.quantize_static(model, ranges, exclude)
        if options.mode == "int8-dynamic":
            return int8.quantize_dynamic(_copy(model), exclude)
        if options.mode == "fp16":
            converted, fp16_report["last"] = fp16.convert_fp16(model, keep_float=exclude, ranges=ranges)
            return converted
        from edgec.compiler.quantize.int4 import quantize_int4

        copy = _copy(model)
        quantize_int4(copy, block_size=options.block_size, symmetric=options.symmetric, method=options.int4_method, exclude=exclude)
        return copy

    result, report_accuracy, chosen = None, None, frozenset()
    if samples is not None and has_real_data:
        eval_set = [s for _, s in zip(range(EVAL_SAMPLES), samples())]
        reference_session = ort_backend.create_session_from_proto(ir.serde.serialize_model(model))
        reference = [ort_backend.run(reference_session, s) for s in eval_set]

        def outputs(kept: frozenset[str]) -> list[dict]:
            session = ort_backend.create_session_from_proto(ir.serde.serialize_model(build(kept)))
            return [ort_backend.run(session, s) for s in eval_set]

        def evaluate(kept: frozenset[str]) -> float:
            return accuracy.drop(reference, outputs(kept), classes, options.metric)

        def smooth(kept: frozenset[str]) -> float:  # ranks layers even when the task metric is coarse
            return accuracy.drop(reference, outputs(kept), classes)

        if options.max_accuracy_drop is not None:
            say("accuracy budget search")
            # fp16: search the weighted layers only; one evaluation per Reshape would buy nothing
            searched = [n.name for n in layers if n.op_type in fp16.COMPUTE_OPS] if options.mode == "fp16" else names
            result = budget.search(searched, evaluate, options.max_accuracy_drop, say, rank=smooth if options.metric else None)
            chosen = frozenset(result.kept_float)
            drop = result.drop
        else:
            drop = evaluate(frozenset())
        report_accuracy = {
            "metric": accuracy.metric_name(reference, classes, options.metric),
            "drop": drop,
            "budget": options.max_accuracy_drop,
            "samples": len(eval_set),
        }
    say(f"quantizing ({options.mode})")
    quantized = build(chosen)
    report = _report(model, quantized, layers, options, chosen, result, report_accuracy, fp16_report.get("last"))
    return quantized, report


def _report(model, quantized, layers, options, chosen, result, report_accuracy, fp16_report=None) -> dict:
    precision = {"int8": "int8", "int8-dynamic": "int8 (dynamic)", "int4": f"int4 (block {options.block_size})", "fp16": "float16"}[options.mode]
    rows = []
    fp16_rows = {row["node"]: row for row in (fp16_report or {}).get("layers", [])}
    for node in layers:
        if node.name in options.keep_float:
            why, prec = "kept float by --keep-float", "float"
        elif node.name in chosen:
            why, prec = "kept float: among the most sensitive layers needed to meet the accuracy budget", "float"
        elif node.name in fp16_rows:  # float16, or float32 for the reason fp16 gives (op rule, range)
            why, prec = fp16_rows[node.name]["reason"], fp16_rows[node.name]["precision"]
        else:
            why, prec = "quantized", precision
        row = {"node": node.name, "op": node.op_type, "precision": prec, "reason": why}
        if result is not None and node.name in result.sensitivity:
            row["sensitivity"] = result.sensitivity[node.name]
        rows.append(row)
    scheme = {
        "int8": {"weights": "int8 symmetric per-channel", "activations": "uint8 asymmetric per-tensor, static"},
        "int8-dynamic": {"weights": "int8 symmetric per-column", "activations": "dynamic (quantized per call)"},
        "int4": {"weights": f"int4 {'symmetric' if options.symmetric else 'asymmetric'} blocks of {options.block_size}, {options.int4_method}",
                 "activations": "float"},
        "fp16": {"weights": "float16 (float32 where a node stays float32)", "activations": "float16 (float32 where a node stays float32)"},
    }[options.mode]
    if options.mode == "int4":
        scheme["int4_accuracy"] = options.int4_accuracy
    return {
        "mode": options.mode,
        **scheme,
        "calibration": options.calibration if options.mode == "int8" else ("minmax" if fp16_report and fp16_report["calibrated"] else None),
        "weight_bytes_before": weight_bytes(model),
        "weight_bytes_after": weight_bytes(quantized),
        "accuracy": report_accuracy,
        "budget_search": None if result is None else {
            "drop_all_quantized": result.drop_all_quantized, "evaluations": result.evaluations, "kept_float": result.kept_float,
        },
        "layers": rows,
        **({"fp16": {k: fp16_report[k] for k in ("nodes_fp16", "nodes_fp32", "kept_fp32_by_op", "casts_inserted", "calibrated", "limit")}}
           if fp16_report else {}),
    }
