"""int8 in QDQ form: static (weights and activations) and dynamic (weights; activations at run time).

Static: per-channel symmetric int8 weights, per-tensor asymmetric uint8 activations from
calibrated ranges, on the ops every int8 backend runs fast (Conv, MatMul, Gemm); elementwise ops
stay float between them. onnxruntime's QDQ quantizer places the Q/DQ pairs (it knows which ops
share scales); edgec supplies the ranges, the op set and the layers to keep float.

    x -> Conv(W) -> y      becomes      x -> Q -> DQ -> Conv(DQ(W_int8)) -> Q -> DQ -> y

uint8 activations are exact to shift to int8 (zero point - 128) for backends that want int8.
Ranges are snapped so that a scalar shift ``t + b`` is whole uint8 steps (``snap_shifts_to_grid``),
which lets a backend fold it into a zero point exactly.

Dynamic: MatMul weights become ``DequantizeLinear(W_int8, scale[N], axis=1)``; activations are
quantized per call by the backend (the cpu target lowers this to DynamicQuantizeMatMul).
"""

from __future__ import annotations

from typing import Collection

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.calibrate import TensorData, TensorsData
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

#: ops with fast int8 kernels in ORT, TFLite and Core ML (W8A8)
STATIC_OPS = ("Conv", "MatMul", "Gemm")


def quantizable_layers(model: ir.Model, op_types: Collection[str] = STATIC_OPS) -> list[ir.Node]:
    """Nodes of the main graph that quantization would touch: the op types, with a constant weight."""
    return [
        n for n in model.graph
        if n.op_type in op_types and n.domain in ("", "ai.onnx") and len(n.inputs) > 1
        and n.inputs[1] is not None and n.inputs[1].const_value is not None
    ]


def quantize_static(model: ir.Model, ranges: TensorsData, exclude: Collection[str] = ()) -> ir.Model:
    """A new model with every weighted layer of ``STATIC_OPS`` not in ``exclude`` in int8 QDQ form.

    Only layers with a constant weight: an activation-by-activation MatMul (attention scores)
    has no fixed range to calibrate well and little to gain.
    """
    layers = [n.name for n in quantizable_layers(model) if n.name not in exclude]
    if not layers:  # onnxruntime reads an empty nodes_to_quantize as "all of them"
        return ir.serde.deserialize_model(ir.serde.serialize_model(model))
    ranges = snap_shifts_to_grid(model, ranges)
    quantizer = QDQQuantizer(
        ir.serde.serialize_model(model),
        per_channel=True,
        reduce_range=False,
        weight_qType=QuantType.QInt8,
        activation_qType=QuantType.QUInt8,
        tensors_range=ranges,
        nodes_to_quantize=layers,
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=list(STATIC_OPS),
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    return ir.serde.deserialize_model(quantizer.quantize_model())


#: how far (relative) a tensor's uint8 step may move so that a constant shift is whole steps
MAX_SNAP = 0.1


def snap_shifts_to_grid(model: ir.Model, ranges: TensorsData) -> TensorsData:
    """Ranges where every ``y = Add(t, b)`` with a scalar constant ``b`` has ``b`` on y's uint8 grid.

    Then ``Q(t + b) = Q(t) + b / step`` exactly, so a backend can fold the shift into the zero point
    (the cpu target does for HardSwish and its learnable affine, PP-LCNetV3's ``a·hardswish(x) + b``,
    see ``targets/cpu/qdq_activations.py``). The step moves by at most ``MAX_SNAP``; a shift
    under half a step is left alone.
    """
    data = dict(ranges.data)
    for node in model.graph:
        y = node.outputs[0]
        if node.op_type != "Add" or y.name not in data or len(node.inputs) != 2:
            continue
        shifts = [v.const_value.numpy() for v in node.inputs if v is not None and v.const_value is not None and v.const_value.size == 1]
        if len(shifts) != 1:
            continue
        shift = float(shifts[0].reshape(()))
        low, high = min(float(data[y.name].range_value[0]), 0.0), max(float(data[y.name].range_value[1]), 0.0)
        step = (high - low) / 255 if high > low else 0.0
        steps = round(shift / step) if step else 0
        if steps == 0 or abs(shift / steps / step - 1) > MAX_SNAP:
            continue
        step = shift / steps
        zero = min(max(round(-low / step), 0), 255)
        data[y.name] = TensorData(lowest=np.float32(-zero * step), highest=np.float32((255 - zero) * step))
    return TensorsData(ranges.calibration_method, data)


def quantize_dynamic(model: ir.Model, exclude: Collection[str] = ()) -> ir.Model:
    """MatMul weights to per-column symmetric int8 behind a DequantizeLinear (in place; returns ``model``)."""
    for node in quantizable_layers(model, ("MatMul",)):
        weight = node.inputs[1]
        w = weight.const_value.numpy()
        if node.name in exclude or w.ndim != 2 or w.dtype != np.float32:
            continue
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        q_value = ir.Value(name=f"{weight.name}_int8", const_value=ir.tensor(q, name=f"{weight.name}_int8"))
        s_value = ir.Value(name=f"{weight.name}_scale", const_value=ir.tensor(scale.astype(np.float32), name=f"{weight.name}_scale"))
        for v in (q_value, s_value):
            v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
            model.graph.register_initializer(v)
        dq = ir.node("DequantizeLinear", [q_value, s_value], attributes={"axis": 1}, name=f"{node.name}_weight_dq")
        dq.outputs[0].name = f"{weight.name}_dequantized"
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(w.shape)
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
    return model
