"""Calibration: the value range of every float tensor, collected one sample at a time.

Memory stays bounded however large the calibration set: each sample's intermediate tensors are
folded into running min/max or histograms and dropped. Methods:
  minmax      min and max seen (the default; best for activations bounded by design)
  percentile  clip at the given percentile of |x| (robust to a few outliers)
  entropy     the KL-divergence-optimal threshold (TensorRT's method), from histograms
Ranges come out as onnxruntime's ``TensorsData``, which its QDQ quantizer consumes.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, TensorData, TensorsData

from edgec.runtime import ort as ort_backend

METHODS = ("minmax", "percentile", "entropy")


def float_tensors(model: ir.Model) -> list[ir.Value]:
    """Graph inputs and node outputs of the main graph that are float tensors."""
    values = [v for v in model.graph.inputs] + [o for n in model.graph for o in n.outputs]
    return [v for v in values if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and v.name]


def augmented(model: ir.Model) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that outputs every float tensor, and those tensors' names."""
    proto = ir.serde.serialize_model(model)
    copy = ir.serde.deserialize_model(proto)
    names = []
    outputs = {v.name for v in copy.graph.outputs}
    for value in float_tensors(copy):
        names.append(value.name)
        if value.name not in outputs and not value.is_graph_input():
            copy.graph.outputs.append(value)
    return ir.serde.serialize_model(copy), names


def collect_ranges(
    model: ir.Model,
    samples: Iterable[dict[str, np.ndarray]],
    method: str = "minmax",
    percentile: float = 99.999,
    progress: Callable[[int], None] | None = None,
) -> TensorsData:
    """Ranges of every float tensor of ``model`` over ``samples`` (streamed)."""
    proto, names = augmented(model)
    session = ort_backend.create_session_from_proto(proto)
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    collector = None
    if method != "minmax":
        collector = HistogramCollector(method, symmetric=False, num_bins=2048, num_quantized_bins=128, percentile=percentile, scenario="same")
    count = 0
    for sample in samples:
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, sample)))
        values.update({k: v for k, v in sample.items() if k in names})
        if collector is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints per call
                collector.collect({k: [values[k]] for k in names if k in values and values[k].size})
        for k in names:
            v = values.get(k)
            if v is None or not v.size:
                continue
            lo, hi = float(v.min()), float(v.max())
            lows[k] = min(lo, lows.get(k, lo))
            highs[k] = max(hi, highs.get(k, hi))
        count += 1
        if progress:
            progress(count)
    if count == 0:
        from edgec.errors import CalibrationError

        raise CalibrationError("the calibration set is empty: give --calib a folder with at least one sample")
    if collector is None:
        data = {k: TensorData(lowest=np.float32(lows[k]), highest=np.float32(highs[k])) for k in lows}
        return TensorsData(CalibrationMethod.MinMax, data)
    with contextlib.redirect_stdout(io.StringIO()):
        result = collector.compute_collection_result()
    cal = CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.Percentile
    data = {}
    for k, v in result.items():
        lo, hi = (float(x) for x in (v[0], v[1]))
        # histograms can clip a tensor that is all one sign to straddle zero; never widen past minmax
        data[k] = TensorData(lowest=np.float32(max(lo, lows[k])), highest=np.float32(min(hi, highs[k])))
    return TensorsData(cal, data)
