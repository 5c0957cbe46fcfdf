"""Target-neutral quantization into QDQ form, under an optional accuracy budget.

Modes:
  int8          static: int8 per-channel weights + uint8 per-tensor activations (needs --calib)
  int8-dynamic  int8 per-column MatMul weights; activations quantized per call by the backend
  int4          block-wise int4 MatMul weights (RTN or HQQ), activations float
  fp16          float16 weights and compute; float32 kept where float16 overflows or loses accuracy
                (op rules, and with --calib the calibrated ranges: see ``fp16``)
The integer modes also quantize embedding tables (``gather``). ``precision`` rules give layers other
precisions than the mode's (a mix per layer, see ``mixed``); ``keep_float`` pins layers in float; with
``max_accuracy_drop`` the most sensitive layers are promoted a step at a time (int4 -> int8 -> float)
until the drop against the float model fits (see ``budget``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from edgec.compiler import verify
from edgec.compiler.pipeline import weight_bytes
from edgec.compiler.quantize import accuracy, budget, calibrate, fp16, gather, mixed
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
    #: (glob over layer names or op types, precision) pairs, the last match wins (see ``mixed``)
    precision: tuple[tuple[str, str], ...] = ()
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


def quantize(
    model: ir.Model, options: QuantOptions, samples: Samples | None, has_real_data: bool,
    progress: Callable[[str], None] | None = None,
) -> tuple[ir.Model, dict]:
    """Quantize ``model`` (float, after the passes); returns the QDQ model and the manifest report."""
    options.check()
    say = progress or (lambda _: None)
    common.NameFixPass()(model)  # layers are named in reports, --keep-float, --precision and the budget search
    classes = verify.class_score_outputs(model)
    layers = mixed.layers(model, {options.mode, *(p for _, p in options.precision)})
    names = [n.name for n in layers]
    unknown = [n for n in options.keep_float if n not in names]
    if unknown:
        raise InputError(f"--keep-float {unknown[0]!r}: not a quantizable layer; they are: {', '.join(names[:20])}"
                         + (" ..." if len(names) > 20 else ""))
    start, why = mixed.assign(layers, options.mode, options.precision, options.keep_float)
    ops = {n.name: n.op_type for n in layers}
    static = any(p == "int8" and ops[n] != "Gather" for n, p in start.items())
    if (static or options.max_accuracy_drop is not None) and not has_real_data:
        need = "int8 static quantization" if static else "--max-accuracy-drop"
        raise CalibrationError(f"{need} needs real inputs: give --calib (a .npz or a folder of them)")

    ranges = None
    if static:
        ranges = calibrate.collect_ranges(
            model, samples(), options.calibration, options.percentile, progress=lambda n: say(f"calibrating: {n} samples")
        )
    elif options.mode == "fp16" and has_real_data:
        # minmax whatever --calibration says: the outliers percentile/entropy clip are what overflows float16
        ranges = calibrate.collect_ranges(model, samples(), "minmax", progress=lambda n: say(f"calibrating: {n} samples"))
    fp16_report: dict = {}
    int4 = {"block_size": options.block_size, "symmetric": options.symmetric, "method": options.int4_method}
    weights_cache: dict = {}

    def build(precision: dict[str, str]) -> ir.Model:
        return mixed.build(model, {**start, **precision}, ranges, int4, fp16_report, weights_cache)

    result, report_accuracy, chosen = None, None, dict(start)
    # fp16: search the weighted layers only; one evaluation per Reshape would buy nothing
    ladders = {n: mixed.ladder(p, ops[n]) for n, p in start.items()
               if p != "float" and (options.mode != "fp16" or ops[n] in fp16.COMPUTE_OPS)}
    if samples is not None and has_real_data:
        eval_set = [s for _, s in zip(range(EVAL_SAMPLES), samples())]
        reference_session = ort_backend.create_session_from_proto(ir.serde.serialize_model(model))
        reference = [ort_backend.run(reference_session, s) for s in eval_set]

        def outputs(precision: dict[str, str]) -> list[dict]:
            session = ort_backend.create_session_from_proto(ir.serde.serialize_model(gather.fold_for_evaluation(build(precision))))
            return [ort_backend.run(session, s) for s in eval_set]

        def evaluate(precision: dict[str, str]) -> float:
            return accuracy.drop(reference, outputs(precision), classes, options.metric)

        def smooth(precision: dict[str, str]) -> float:  # ranks layers even when the task metric is coarse
            return accuracy.drop(reference, outputs(precision), classes)

        if options.max_accuracy_drop is not None:
            say("accuracy budget search")
            by_name = {n.name: n for n in layers}
            result = budget.search(ladders, evaluate, options.max_accuracy_drop, say, rank=smooth if options.metric else None,
                                   size=lambda name, p: mixed.size_at(by_name[name], p, options.block_size))
            chosen.update(result.precision)
            drop = result.drop
        else:
            drop = evaluate({})
        report_accuracy = {
            "metric": accuracy.metric_name(reference, classes, options.metric),
            "drop": drop,
            "budget": options.max_accuracy_drop,
            "samples": len(eval_set),
        }
    say("quantizing" + (f" ({options.mode})" if not options.precision else " (mixed per layer)"))
    quantized = build(chosen)
    report = _report(model, quantized, layers, options, start, chosen, why, ladders, result, report_accuracy, fp16_report.get("last"))
    return quantized, report


def _report(model, quantized, layers, options, start, chosen, why, ladders, result, report_accuracy, fp16_report=None) -> dict:
    rows = []
    fp16_rows = {row["node"]: row for row in (fp16_report or {}).get("layers", [])}
    after = {n.name: n for n in quantized.graph}
    sizes_before = mixed.weight_bytes_by_layer(model, layers)
    promoted = [] if result is None else result.promoted(ladders)
    for node in layers:
        prec = chosen[node.name]
        reason = why[node.name]
        if node.name in promoted:
            reason = (f"kept float: among the most sensitive layers needed to meet the accuracy budget (from {start[node.name]})"
                      if prec == "float" else
                      f"promoted {start[node.name]} -> {prec}: among the most sensitive layers (per byte) for the accuracy budget")
        label = mixed.label(prec, node.op_type, options.block_size)
        if prec == "fp16" and node.name in fp16_rows:  # float16, or float32 for the reason fp16 gives (op rule, range)
            reason, label = fp16_rows[node.name]["reason"], fp16_rows[node.name]["precision"]
        row = {"node": node.name, "op": node.op_type, "precision": label, "reason": reason}
        if sizes_before[node.name]:
            row["weight_bytes"] = [sizes_before[node.name], mixed.weight_bytes_by_layer(quantized, [after[node.name]])[node.name]
                                   if node.name in after else 0]
        if result is not None and node.name in result.sensitivity:
            row["sensitivity"] = result.sensitivity[node.name]
        if result is not None and node.name in result.sensitivity_middle:
            row["sensitivity_middle"] = result.sensitivity_middle[node.name]
        rows.append(row)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["precision"]] = counts.get(row["precision"], 0) + 1
    used = sorted({p for p in chosen.values() if p != "float"})
    single = used[0] if len(used) == 1 else None
    scheme = {
        "int8": {"weights": "int8 symmetric per-channel", "activations": "uint8 asymmetric per-tensor, static"},
        "int8-dynamic": {"weights": "int8 symmetric per-column", "activations": "dynamic (quantized per call)"},
        "int4": {"weights": f"int4 {'symmetric' if options.symmetric else 'asymmetric'} blocks of {options.block_size}, {options.int4_method}",
                 "activations": "float"},
        "fp16": {"weights": "float16 (float32 where a node stays float32)", "activations": "float16 (float32 where a node stays float32)"},
        None: {"weights": "per layer: " + ", ".join(f"{c} {p}" for p, c in counts.items()), "activations": "per layer"},
    }[single if single or not used else None]
    if "int4" in used:
        scheme["int4_accuracy"] = options.int4_accuracy
    return {
        "mode": options.mode,
        "precisions": used,
        **scheme,
        "calibration": options.calibration if any(chosen[n.name] == "int8" and n.op_type != "Gather" for n in layers)
        else ("minmax" if fp16_report and fp16_report["calibrated"] else None),
        "weight_bytes_before": weight_bytes(model),
        "weight_bytes_after": weight_bytes(quantized),
        "accuracy": report_accuracy,
        "budget_search": None if result is None else {
            "drop_all_quantized": result.drop_all_quantized, "evaluations": result.evaluations,
            "kept_float": [n for n in promoted if chosen[n] == "float"],
            "promoted": {n: f"{start[n]} -> {chosen[n]}" for n in promoted},
        },
        "layers": rows,
        **({"fp16": {k: fp16_report[k] for k in ("nodes_fp16", "nodes_fp32", "kept_fp32_by_op", "casts_inserted", "calibrated", "limit")}}
           if fp16_report else {}),
    }
