"""Per-layer precision: which layer gets which mode, and the QDQ model for such a mix.

Every layer (a Conv/MatMul/Gemm with a constant weight, or a Gather from a constant table) gets one
precision. ``--quantize MODE`` gives the default; ``--precision PATTERN=PRECISION`` (repeatable, the
last match wins) overrides it for the layers whose name or op type matches the glob PATTERN:

    edgec compile m.onnx --quantize int4 --precision Conv=int8 --calib d/       int4 MatMuls, int8 Convs
    edgec compile m.onnx --quantize int8 --precision '*attention*=float'       int8 but attention float

| precision      | applies to                         | form                                                   |
|----------------|------------------------------------|--------------------------------------------------------|
| int8           | Conv, MatMul, Gemm (static, calib) | Q/DQ activations + per-channel int8 weights (``int8``)  |
|                | Gather tables                      | int8 table blocks (``gather``)                          |
| int8-dynamic   | MatMul; Gather tables              | per-column int8 weights (``int8``); int8 table blocks    |
| int4           | MatMul, Gemm; Gather tables        | int4 weight blocks (``int4``); int4 table blocks         |
| fp16           | every float node                   | ``fp16`` (mixes with float only)                         |
| float          | anything                           | unchanged                                               |

A layer the default mode does not apply to stays float (int4 leaves Convs float); a layer a
``--precision`` pattern names must accept that precision, or the compile stops and says why.

The accuracy budget promotes layers along ``ladder``: int4 -> int8 -> float, int8 -> float.
"""

from __future__ import annotations

import fnmatch
from typing import Collection, Mapping

import numpy as np
import onnx_ir as ir

from edgec.compiler.quantize import fp16, gather, int8
from edgec.errors import InputError

PRECISIONS = ("int8", "int8-dynamic", "int4", "fp16", "float")
#: ops each precision quantizes (fp16 converts every float node instead)
OPS = {
    "int8": ("Conv", "MatMul", "Gemm", "Gather"),
    "int8-dynamic": ("MatMul", "Gather"),
    "int4": ("MatMul", "Gemm", "Gather"),
}


def layers(model: ir.Model, precisions: Collection[str]) -> list[ir.Node]:
    """The layers any of ``precisions`` could quantize, in graph order."""
    if "fp16" in precisions:
        return fp16.float_nodes(model)
    ops = {op for p in precisions for op in OPS.get(p, ())}
    weighted = {id(n) for n in int8.quantizable_layers(model, tuple(ops - {"Gather"}))}
    tables = {id(n) for n in gather.quantizable_tables(model)} if "Gather" in ops else set()
    return [n for n in model.graph if id(n) in weighted or id(n) in tables]


def applies(precision: str, node: ir.Node) -> bool:
    return precision in ("float", "fp16") or node.op_type in OPS[precision]


def assign(
    nodes: list[ir.Node], default: str, rules: tuple[tuple[str, str], ...], keep_float: Collection[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(layer -> precision, layer -> why) from the default mode, ``--precision`` rules and ``--keep-float``."""
    precision, why = {}, {}
    for node in nodes:
        if applies(default, node):
            precision[node.name], why[node.name] = default, "quantized"
        else:
            precision[node.name], why[node.name] = "float", f"float: {default} does not apply to {node.op_type}"
    for pattern, value in rules:
        if value not in PRECISIONS:
            raise InputError(f"--precision {pattern}={value}: unknown precision; choose one of {', '.join(PRECISIONS)}")
        matched = [n for n in nodes if fnmatch.fnmatchcase(n.name, pattern) or fnmatch.fnmatchcase(n.op_type, pattern)]
        if not matched:
            names = ", ".join(n.name for n in nodes[:12]) + (" ..." if len(nodes) > 12 else "")
            raise InputError(f"--precision {pattern}={value}: matches no quantizable layer (by name or op type); they are: {names}")
        for node in matched:
            if not applies(value, node):
                ops = ", ".join(OPS[value])
                raise InputError(f"--precision {pattern}={value}: layer {node.name!r} is a {node.op_type}; {value} applies to {ops}")
            precision[node.name], why[node.name] = value, f"set by --precision {pattern}={value}"
    for name in keep_float:
        precision[name], why[name] = "float", "kept float by --keep-float"
    used = set(precision.values()) - {"float"}
    if "fp16" in used and len(used) > 1:
        raise InputError(f"fp16 mixes only with float, not with {', '.join(sorted(used - {'fp16'}))}: "
                         "give those layers float, or use one integer mode per layer")
    return precision, why


def ladder(precision: str, op_type: str) -> tuple[str, ...]:
    """The precisions the accuracy budget may move a layer through, lowest first, ending at float."""
    if precision == "int4" and op_type in ("MatMul", "Gather"):
        return ("int4", "int8-dynamic", "float")  # weight-only int8 is the next step up from weight-only int4
    return (precision, "float") if precision != "float" else ("float",)


def build(model: ir.Model, precision: Mapping[str, str], ranges, int4: dict, fp16_report: dict, cache: dict) -> ir.Model:
    """A new QDQ model with each layer in its precision; ``model`` is left as it is.

    ``ranges``: calibrated activation ranges (needed when a layer is static int8); ``int4``: block_size,
    symmetric, method; ``fp16_report`` receives fp16's report under "last" when fp16 layers exist;
    ``cache`` keeps quantized weights between builds of the same ``model``.
    """
    def named(*values: str) -> set[str]:
        return {n for n, p in precision.items() if p in values}

    table_names = {n.name for n in gather.quantizable_tables(model)}
    everything = set(precision) | {n.name for n in model.graph}
    if named("fp16"):
        converted, fp16_report["last"] = fp16.convert_fp16(model, keep_float=named("float"), ranges=ranges)
        return converted
    static = named("int8") - table_names
    if static:
        if ranges is None:
            raise InputError("int8 static layers need calibrated ranges: give --calib")
        out = int8.quantize_static(model, ranges, everything - static)
    else:
        out = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    dynamic = named("int8-dynamic") - table_names
    if dynamic:
        int8.quantize_dynamic(out, everything - dynamic)
        quantize_activations_per_call(out, dynamic)
    int4_layers = named("int4") - table_names
    if int4_layers:
        from edgec.compiler.quantize.int4 import quantize_int4

        quantize_int4(out, exclude=everything - int4_layers, cache=cache.setdefault("int4", {}), **int4)
    tables = {n: (4 if p == "int4" else 8) for n, p in precision.items() if n in table_names and p != "float"}
    if tables:
        gather.quantize_tables(out, tables, int4["block_size"], cache.setdefault("tables", {}))
    return out


def quantize_activations_per_call(model: ir.Model, names: Collection[str]) -> None:
    """Spell out what int8-dynamic's backend does per call, so the QDQ model computes the same numbers:

        MatMul(a, DQ(W_int8))   becomes   MatMul(DQ(DynamicQuantizeLinear(a)), DQ(W_int8))

    DynamicQuantizeLinear is ONNX's uint8, asymmetric, per-tensor quantization with the range taken
    from ``a`` at run time: what ORT's DynamicQuantizeMatMul does inside. One per activation, shared
    by the MatMuls reading it (attention's query, key and value).
    """
    quantized: dict[int, ir.Value] = {}
    for node in list(model.graph):
        if node.name not in names or node.op_type != "MatMul":
            continue
        weight = node.inputs[1].producer()
        if weight is None or weight.op_type != "DequantizeLinear":
            continue  # left float by int8.quantize_dynamic (not a 2-D float32 weight)
        a = node.inputs[0]
        if id(a) not in quantized:
            dql = ir.node("DynamicQuantizeLinear", [a], name=f"{node.name}/dynamic_quantize", num_outputs=3)
            dq = ir.node("DequantizeLinear", list(dql.outputs), name=f"{node.name}/dynamic_dequantize")
            for value, suffix in zip(dql.outputs, ("q", "scale", "zero_point")):
                value.name = f"{a.name}_dynamic_{suffix}"
            dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = f"{a.name}_dynamic_dq", a.dtype, a.shape
            model.graph.insert_before(node, [dql, dq])
            quantized[id(a)] = dq.outputs[0]
        node.replace_input_with(0, quantized[id(a)])


def size_at(node: ir.Node, precision: str, block_size: int) -> float:
    """Bytes the layer's weight takes at ``precision`` (codes and scales), to weigh the budget's promotions."""
    index = 0 if node.op_type == "Gather" else 1
    weight = node.inputs[index] if len(node.inputs) > index else None
    elements = weight.const_value.size if weight is not None and weight.const_value is not None else 0
    per_element = {"int4": 0.5 + 4 / block_size, "int8": 1.0, "int8-dynamic": 1.0, "fp16": 2.0, "float": 4.0}[precision]
    return elements * per_element


def label(precision: str, op_type: str, block_size: int) -> str:
    """How a layer's precision reads in the manifest and ``inspect``."""
    if op_type == "Gather" and precision in ("int8", "int8-dynamic", "int4"):
        block = block_size if precision == "int4" else gather.INT8_TABLE_BLOCK
        return f"{precision[:4]} table (block {block})"
    return {"int8": "int8", "int8-dynamic": "int8 (dynamic)", "int4": f"int4 (block {block_size})",
            "fp16": "float16", "float": "float"}[precision]


def weight_bytes_by_layer(model: ir.Model, nodes: list[ir.Node]) -> dict[str, int]:
    """Bytes of the constant weights each layer reads in ``model`` (codes, scales, zero points; 4-bit packed)."""
    sizes = {}
    for node in nodes:
        sizes[node.name] = sum(_const_bytes(v) for v in node.inputs if v is not None)
    return sizes


def _const_bytes(value: ir.Value, depth: int = 0) -> int:
    if value.const_value is not None:
        t = value.const_value
        bits = 4 if t.dtype in (ir.DataType.INT4, ir.DataType.UINT4) else t.dtype.itemsize * 8
        return int(np.ceil(t.size * bits / 8))
    producer = value.producer()
    if producer is None or depth > 2 or producer.op_type not in ("DequantizeLinear", "Cast"):
        return 0
    return sum(_const_bytes(v, depth + 1) for v in producer.inputs if v is not None)
