"""Verification: run the source model and the compiled artifact on the same inputs and compare.

Per output, over all samples: max and mean absolute error, the max error relative to the
reference's magnitude, cosine similarity, and top-1 agreement along the last axis for
outputs that are class scores (see ``class_score_outputs``). A compile whose relative error exceeds
the tolerance fails, naming the worst output.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterable

import numpy as np
import onnx_ir as ir

from edgec.errors import VerificationError

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

DEFAULT_TOLERANCE = 1e-3


def class_score_outputs(model: ir.Model) -> set[str]:
    """Outputs that are class scores, where top-1 agreement is the measure that matters.

    Named ``logits`` (decoders: top-1 is next-token agreement), made by Softmax/LogSoftmax along
    the last axis, or a (batch, classes) result of a final
    Gemm/MatMul (+ bias). Shape alone cannot tell: a transformer's (batch, seq, hidden) state
    looks like (batch, seq, classes).
    """
    found = set()
    for value in model.graph.outputs:
        node = value.producer()
        if node is None or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        if node.op_type in ("Softmax", "LogSoftmax") or value.name == "logits":  # a decoder's next-token scores
            found.add(value.name)
        elif node.op_type == "Add" and any(i.producer() is not None and i.producer().op_type == "MatMul" for i in node.inputs):
            node = next(i.producer() for i in node.inputs if i.producer() is not None and i.producer().op_type == "MatMul")
        if node.op_type in ("Gemm", "MatMul") and value.shape is not None and len(value.shape) == 2:
            found.add(value.name)
    return found


class _Accumulator:
    def __init__(self) -> None:
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.ref_max = 0.0
        self.dot = self.ref_sq = self.out_sq = 0.0
        self.top1_match = self.top1_total = 0

    def add(self, ref: np.ndarray, out: np.ndarray, scores: bool) -> None:
        if ref.shape != out.shape:
            raise VerificationError(f"shape {list(out.shape)} differs from the source model's {list(ref.shape)}")
        if ref.dtype.kind not in "fc":  # integer/bool outputs must match exactly
            ref, out = ref.astype(np.float64), out.astype(np.float64)
        r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        diff = np.abs(r - o)
        if r.size:
            self.max_abs = max(self.max_abs, float(np.nan_to_num(diff.max(), nan=np.inf)))
            self.ref_max = max(self.ref_max, float(np.abs(r).max()))
        self.abs_sum += float(np.nan_to_num(diff.sum(), nan=np.inf))
        self.count += r.size
        self.dot += float(r @ o)
        self.ref_sq += float(r @ r)
        self.out_sq += float(o @ o)
        if scores:
            self.top1_match += int((ref.argmax(-1) == out.argmax(-1)).sum())
            self.top1_total += int(np.prod(ref.shape[:-1]))

    def result(self) -> dict:
        denom = np.sqrt(self.ref_sq * self.out_sq)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.ref_sq == self.out_sq else 0.0)
        metrics = {
            "max_abs": self.max_abs,
            "mean_abs": self.abs_sum / max(self.count, 1),
            "rel_err": self.max_abs / max(1.0, self.ref_max),
            "cosine": float(cosine),
        }
        if self.top1_total:
            metrics["top1"] = self.top1_match / self.top1_total
        return metrics


def compare(
    source: Runner,
    artifact: Runner,
    samples: Iterable[dict[str, np.ndarray]],
    tolerance: float | None = DEFAULT_TOLERANCE,
    data: str = "generated",
    class_scores: Collection[str] = (),
) -> dict:
    """Run both on every sample; return the report; raise ``VerificationError`` past ``tolerance``.

    ``tolerance=None`` measures without judging (quantized bundles: their budget is accuracy).
    """
    acc: dict[str, _Accumulator] = {}
    n = 0
    for sample in samples:
        ref, out = source(sample), artifact(sample)
        for name, value in ref.items():
            if name not in out:
                raise VerificationError(f"output {name!r} is missing from the compiled artifact")
            try:
                acc.setdefault(name, _Accumulator()).add(value, out[name], name in class_scores)
            except VerificationError as exc:
                raise VerificationError(f"output {name!r}: {exc}") from None
        n += 1
    if n == 0:
        raise VerificationError("no samples to verify with (the calibration set is empty)")
    outputs = {name: a.result() for name, a in acc.items()}
    worst = max(outputs, key=lambda k: outputs[k]["rel_err"])
    report = {
        "samples": n,
        "data": data,
        "tolerance": tolerance,
        "outputs": outputs,
        "worst_output": worst,
        "passed": tolerance is None or outputs[worst]["rel_err"] <= tolerance,
    }
    if not report["passed"]:
        m = outputs[worst]
        raise VerificationError(
            f"verification failed: output {worst!r} differs from the source model by {m['max_abs']:.3g} "
            f"(relative {m['rel_err']:.3g} > tolerance {tolerance:g}, cosine {m['cosine']:.5f}); "
            f"raise --tolerance if this is expected, or drop passes with --disable-pass to find the cause",
            report,
        )
    return report
