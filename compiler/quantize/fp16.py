"""float16 weights and compute, with float32 kept where float16 would overflow or lose accuracy.

    x(f32) -> Conv(W) -> ReduceMean -> ... -> Softmax -> y(f32)
becomes
    x(f32) -> Cast(f16) -> Conv(W_f16) -> Cast(f32) -> ReduceMean -> ... -> Softmax -> y(f32)

Graph inputs and outputs keep their float32 type: Casts sit at the boundary, and around every node
kept in float32. A node stays float32 when
  - it is named in ``keep_float``;
  - its op is unsafe in float16 whatever the data (``FLOAT32_OPS``, each with its reason);
  - with calibrated ``ranges``, a float input or output reaches beyond ``limit`` (4096 by default:
    float16 tops out at 65504, and the next op's sums need headroom), or all its magnitudes are
    below 1e-4 (float16's normal range ends at 6.1e-5; below it precision drains away); a weight
    beyond 65504 keeps its consumer in float32 too;
  - it computes on integers turned into floats (shape and index arithmetic: float16 counts exactly
    only to 2048), or its schema does not allow float16 where the model has float32;
  - it does no heavy compute and all its float inputs stay float32 anyway (``follows``): converting
    it would only add Casts, e.g. the Reshape after a float32 Softmax at the graph's end.
Subgraphs (If/Loop/Scan bodies) are converted inside; the control-flow node and its bodies'
inputs and outputs stay float32. Float weights used only by float16 nodes are stored as float16;
one used by both kinds is stored once in each type.

This is ONNX Runtime's ``transformers.float16.convert_float_to_float16`` done on onnx_ir: that
tool appends every Cast it inserts to the main graph (nodes out of topological order, and Casts
for nodes inside If/Loop bodies placed outside them, where their inputs do not exist), keeps
float32 graph inputs by casting them to float16 before blocked nodes cast them back, and turns
shared weights to float16 even for float32 nodes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Collection, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from edgec.compiler.pipeline import weight_bytes
from edgec.errors import InputError

if TYPE_CHECKING:
    from onnxruntime.quantization.calibrate import TensorsData

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = 65504.0
#: a tensor whose largest magnitude is below this lives in or next to float16's subnormals
TINY = 1e-4
#: the smallest float16 subnormal: nonzero weights are rounded no lower (an epsilon must not become 0)
_FP16_MIN_SUBNORMAL = 2.0**-24

_SUMS = ("accumulates a sum of same-signed terms (a mean is a sum divided afterwards): the running sum "
         "reaches N times the mean inside the kernel, beyond what calibrating its input or output shows, "
         "and each term added to a large float16 sum loses its low bits")
#: ops kept float32 whatever the data, and why
FLOAT32_OPS = {
    **dict.fromkeys(("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
                     "ReduceLogSumExp", "ReduceProd", "CumSum", "GlobalAveragePool", "GlobalLpPool", "LpPool"), _SUMS),
    "Softmax": ("its denominator sums up to one term per class, and with many classes most probabilities fall "
                "below float16's normal range (6.1e-5: PP-OCRv4 has 6625 classes)"),
    "LogSoftmax": "its log-sum-exp sums up to one term per class",
    "Pow": ("a square doubles the exponent: |x| > 256 overflows float16 and |x| < 2.4e-4 squares to zero "
            "(the variance of a decomposed LayerNorm)"),
    "Exp": "overflows float16 for inputs above 11",
    **dict.fromkeys(("InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization", "LpNormalization"),
                    "computes its statistics (sums of squares) in the input's type"),
    "Range": "builds index sequences: float16 counts exactly only to 2048",
}
#: ops whose cost is arithmetic on weights: always worth float16, never kept float32 only to save Casts
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "LSTM", "GRU", "RNN", "Attention"})
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


@dataclass
class _Slots:
    """What a node's schema allows: float16 per input/output slot, outputs typed by an attribute."""

    inputs: list[bool]
    outputs: list[bool]
    from_attribute: list[bool]

    # a variadic parameter is the last one and covers every further input or output

    def input(self, i: int) -> bool:
        return self.inputs[min(i, len(self.inputs) - 1)] if self.inputs else False

    def output(self, i: int) -> bool:
        return self.outputs[min(i, len(self.outputs) - 1)] if self.outputs else False

    def output_from_attribute(self, i: int) -> bool:
        return self.from_attribute[min(i, len(self.from_attribute) - 1)] if self.from_attribute else False


@lru_cache(maxsize=None)
def _slots(domain: str, op: str, opset: int) -> _Slots | None:
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    f16 = lambda p: "tensor(float16)" in allowed.get(p.type_str, {p.type_str})  # noqa: E731
    typed_by_inputs = {p.type_str for p in schema.inputs}
    return _Slots(
        [f16(p) for p in schema.inputs], [f16(p) for p in schema.outputs],
        [p.type_str in allowed and p.type_str not in typed_by_inputs for p in schema.outputs],
    )


def _is_float(v: ir.Value | None) -> bool:
    return v is not None and isinstance(v.type, ir.TensorType) and v.dtype == FLOAT


def _present(v: ir.Value | None) -> bool:
    """False for an omitted optional input, and for an unused optional output left untyped (LSTM's Y)."""
    return v is not None and not (v.type is None and not v.name and not v.uses() and not v.is_graph_output())


def _is_weight(v: ir.Value) -> bool:
    return v.is_initializer() or (v.producer() is not None and v.producer().op_type == "Constant" and not v.producer().domain)


def _label(node: ir.Node) -> str:
    if node.name:
        return node.name
    return f"<{node.op_type} producing {node.outputs[0].name}>" if node.outputs else f"<unnamed {node.op_type}>"


def _opset(model: ir.Model, node: ir.Node) -> int:
    if node.version is not None:
        return node.version
    return model.opset_imports.get(node.domain or "", model.opset_imports.get("", 1))


def _range_table(ranges: TensorsData | Mapping[str, tuple[float, float]] | None) -> dict[str, float]:
    """Largest magnitude per tensor, from onnxruntime's ``TensorsData`` or a name -> (low, high) dict."""
    if ranges is None:
        return {}
    items = ranges.data.items() if hasattr(ranges, "data") else ranges.items()
    table = {}
    for name, r in items:
        lo, hi = (float(x) for x in (r.range_value if hasattr(r, "range_value") else r))
        table[name] = max(abs(lo), abs(hi))
    return table


def float_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes (subgraphs included) that read or write float32 tensors: what fp16 conversion decides on."""
    return [
        n for n in ir.traversal.RecursiveGraphIterator(model.graph)
        if not (n.op_type == "Constant" and not n.domain)
        and any(_is_float(v) or (_present(v) and v.type is None) for v in (*n.inputs, *n.outputs))
    ]


def convert_fp16(
    model: ir.Model,
    *,
    keep_float: Collection[str] = (),
    ranges: TensorsData | Mapping[str, tuple[float, float]] | None = None,
    limit: float = 4096.0,
) -> tuple[ir.Model, dict]:
    """A new model computing in float16 where that is safe; ``model`` is left as it was.

    ``ranges`` are calibrated tensor ranges (``calibrate.collect_ranges`` on ``model``, or a dict of
    name -> (low, high)); without them only the data-independent rules apply. Returns the model and
    a report: counts of float16 and float32 nodes, the Casts inserted, weight bytes before and after,
    and ``layers``: one row per float node (subgraphs included) with its precision ("float16", or
    "float" where it stays float32) and the reason, in the form of the other modes' reports.
    """
    if not 0 < limit <= FP16_MAX:
        raise InputError(f"fp16 limit {limit}: give a magnitude in (0, {FP16_MAX:g}]")
    keep = set(keep_float)
    names = {n.name for n in float_nodes(model)}
    unknown = sorted(keep - names)
    if unknown:
        listed = sorted(names)
        raise InputError(f"keep_float {unknown[0]!r}: not a node that computes in float; they are: {', '.join(listed[:20])}"
                         + (" ..." if len(listed) > 20 else ""))
    bytes_before = weight_bytes(model)
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    try:  # fill in types the passes left unset; an untyped value keeps its nodes in float32
        common.ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # onnx's inference fails on some valid models; conversion does not need it
        pass
    plan = _Plan(model, keep, _range_table(ranges), limit)
    plan.decide()
    casts = _Rewriter(model, plan).rewrite()
    layers = [
        {"node": _label(n), "op": n.op_type, "precision": "float16" if p == FLOAT16 else "float", "reason": why}
        for n, (p, why) in plan.decisions.items()
    ]
    kept = [row for row in layers if row["precision"] == "float"]
    report = {
        "nodes_fp16": len(layers) - len(kept),
        "nodes_fp32": len(kept),
        "kept_fp32_by_op": dict(Counter(row["op"] for row in kept)),
        "casts_inserted": casts,
        "calibrated": bool(plan.ranges),
        "limit": limit,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": weight_bytes(model),
        "layers": layers,
    }
    return model, report


class _Plan:
    """Decides float16 or float32 for every float node, in topological order."""

    def __init__(self, model: ir.Model, keep: set[str], ranges: dict[str, float], limit: float):
        self.model, self.keep, self.ranges, self.limit = model, keep, ranges, limit
        self.decisions: dict[ir.Node, tuple[ir.DataType, str]] = {}
        self.half: set[ir.Value] = set()  # activations that will be float16
        self.from_integers: set[ir.Value] = set()  # shape/index arithmetic carried in floats

    def decide(self) -> None:
        for node in float_nodes(self.model):
            precision, why = self._decide(node)
            self.decisions[node] = (precision, why)
            if precision == FLOAT16:
                slots = self.slots(node)
                self.half.update(o for i, o in enumerate(node.outputs) if _is_float(o) and slots.output(i))

    def slots(self, node: ir.Node) -> _Slots:
        return _slots(node.domain, node.op_type, _opset(self.model, node))

    def wants_half(self, node: ir.Node, index: int) -> bool:
        """Whether input ``index`` of ``node`` is to be fed float16 (it is float32 in the source)."""
        precision, _ = self.decisions.get(node, (FLOAT, ""))
        return precision == FLOAT16 and self.slots(node).input(index)

    def _decide(self, node: ir.Node) -> tuple[ir.DataType, str]:
        op, values = node.op_type, [v for v in (*node.inputs, *node.outputs) if _present(v)]
        activations = [v for v in node.inputs if _is_float(v) and not _is_weight(v)]
        if node.name in self.keep:
            return FLOAT, "kept float by keep_float"
        if any(v.type is None for v in values):
            return FLOAT, "a tensor's type is unknown"
        if any(not isinstance(v.type, ir.TensorType) for v in values):
            return FLOAT, "reads or writes sequences or optionals"
        if op in _CONTROL_FLOW and not node.domain:
            return FLOAT, "control flow: its bodies are converted inside; its inputs and outputs stay float32"
        if op in FLOAT32_OPS and not node.domain:
            return FLOAT, FLOAT32_OPS[op]
        slots = self.slots(node)
        opset = _opset(self.model, node)
        if slots is None:
            return FLOAT, f"no ONNX schema for {node.domain or 'ai.onnx'}::{op} (opset {opset}) tells which tensors may be float16"
        float_in = [i for i, v in enumerate(node.inputs) if _is_float(v)]
        float_out = [i for i, v in enumerate(node.outputs) if _is_float(v)]
        if not any(slots.input(i) for i in float_in) and not any(slots.output(i) for i in float_out):
            return FLOAT, f"{op} at opset {opset} takes float32 only"
        if op == "Cast" and not node.domain:
            source = node.inputs[0]
            if source.dtype not in (FLOAT, FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16):
                if node.outputs[0].shape is not None and node.outputs[0].shape.rank() <= 1:
                    self.from_integers.add(node.outputs[0])
                    return FLOAT, "turns integers into floats (shape/index arithmetic): float16 counts exactly only to 2048"
        elif op != "ConstantOfShape" and any(slots.output_from_attribute(i) for i in float_out):
            return FLOAT, f"{op}'s output type is set by an attribute"
        if any(v in self.from_integers for v in activations):
            self.from_integers.update(o for o in node.outputs if _is_float(o) and o.shape is not None and o.shape.rank() <= 1)
            return FLOAT, "computes on integers turned into floats (shape/index arithmetic): float16 counts exactly only to 2048"
        if self.ranges:
            why = self._out_of_range(node, activations)
            if why:
                return FLOAT, why
        for v in node.inputs:
            if _is_float(v) and _is_weight(v):
                w = _weight_array(v)
                if w is not None and w.size and float(np.abs(w).max()) > FP16_MAX:
                    return FLOAT, f"weight {v.name!r} reaches {float(np.abs(w).max()):.4g}, beyond float16's 65504"
        if activations and op not in COMPUTE_OPS and not any(v in self.half for v in activations):
            return FLOAT, "follows its float32 inputs: converting it would only add Casts"
        return FLOAT16, "converted"

    def _out_of_range(self, node: ir.Node, activations: list[ir.Value]) -> str | None:
        window = 1
        if node.op_type == "AveragePool":  # its sum spans the window: the same hazard as a reduction
            window = int(np.prod(node.attributes["kernel_shape"].as_ints())) if "kernel_shape" in node.attributes else 1
        for kind, v in [("input", v) for v in activations] + [("output", o) for o in node.outputs if _is_float(o)]:
            m = self.ranges.get(v.name)
            if m is None:
                continue
            if kind == "input" and window > 1 and m * window > self.limit:
                return f"its window sums {window} inputs of magnitude up to {m:.4g}: {m * window:.4g} > limit {self.limit:g}"
            if m > self.limit:
                return f"{kind} {v.name!r} reaches {m:.4g} > limit {self.limit:g} (float16 max 65504)"
            if 0 < m < TINY:
                return f"{kind} {v.name!r} stays below {m:.2g}: all its values are float16 subnormals or near them"
        return None


def _weight_array(v: ir.Value) -> np.ndarray | None:
    if v.const_value is not None:
        return v.const_value.numpy()
    producer = v.producer()
    if producer is not None and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def to_half(array: np.ndarray) -> np.ndarray:
    """float32 -> float16 keeping sign and nonzero-ness: tiny nonzero values round to the smallest
    subnormal rather than to zero (an epsilon added before a division must stay nonzero); finite
    values beyond float16's range saturate rather than becoming infinite."""
    a = np.asarray(array, np.float32)
    tiny = (a != 0) & (np.abs(a) < _FP16_MIN_SUBNORMAL)
    a = np.where(tiny, np.copysign(_FP16_MIN_SUBNORMAL, a), a)
    a = np.where(np.isfinite(a), np.clip(a, -FP16_MAX, FP16_MAX), a)
    return a.astype(np.float16)


class _Rewriter:
    """Applies a plan: retypes float16 nodes' outputs, converts weights, inserts the Casts."""

    def __init__(self, model: ir.Model, plan: _Plan):
        self.model, self.plan = model, plan
        self.names = {v.name for g in model.graphs() for v in (*g.inputs, *g.initializers.values())}
        self.names |= {o.name for n in ir.traversal.RecursiveGraphIterator(model.graph) for o in n.outputs}
        self.names |= {n.name for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name}
        self.cast_cache: dict[tuple[int, ir.Value, ir.DataType], ir.Value] = {}
        self.halves: dict[ir.Value, ir.Value] = {}
        self.casts = 0

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def rewrite(self) -> int:
        self._convert_weights()
        for node in list(self.plan.decisions):
            self._feed(node)
            if self.plan.decisions[node][0] == FLOAT16:
                self._retype_outputs(node)
        for graph in self.model.graphs():
            self._float_outputs(graph)
        return self.casts

    def _convert_weights(self) -> None:
        """Weights read only as float16 become float16 in place; shared ones get a float16 twin."""
        for graph in self.model.graphs():
            for v in list(graph.initializers.values()):
                self._convert_weight(v, graph)
        for node in list(ir.traversal.RecursiveGraphIterator(self.model.graph)):
            if node.op_type == "Constant" and not node.domain and "value" in node.attributes and _is_float(node.outputs[0]):
                self._convert_weight(node.outputs[0], node.graph)

    def _convert_weight(self, v: ir.Value, graph: ir.Graph) -> None:
        if not _is_float(v):
            return
        wants = {self.plan.wants_half(node, i) for node, i in v.uses()}
        if True not in wants:
            return
        half = to_half(_weight_array(v))
        if wants == {True} and not v.is_graph_output() and not v.is_graph_input():
            if v.is_initializer():
                v.const_value = ir.tensor(half, name=v.name)
            else:
                v.producer().attributes["value"] = ir.AttrTensor("value", ir.tensor(half, name=v.name))
            v.dtype = FLOAT16
            self.plan.half.add(v)
            return
        twin = ir.Value(name=self.fresh(f"{v.name}_fp16"), const_value=ir.tensor(half), shape=ir.Shape(half.shape),
                        type=ir.TensorType(FLOAT16))
        twin.const_value.name = twin.name
        (v.graph or graph).register_initializer(twin)
        self.halves[v] = twin

    def _feed(self, node: ir.Node) -> None:
        """Give each float input the type the node now computes in."""
        for i, v in enumerate(node.inputs):
            if v is None or not isinstance(v.type, ir.TensorType) or v.dtype not in (FLOAT, FLOAT16):
                continue
            source_float = v.dtype == FLOAT or v in self.plan.half
            if not source_float:
                continue  # float16 in the source model: not ours to touch
            want = FLOAT16 if self.plan.wants_half(node, i) else FLOAT
            if v.dtype == want:
                continue
            if want == FLOAT16 and v in self.halves:
                node.replace_input_with(i, self.halves[v])
            else:
                node.replace_input_with(i, self._cast(v, want, node.graph))

    def _retype_outputs(self, node: ir.Node) -> None:
        slots = self.plan.slots(node)
        for i, o in enumerate(node.outputs):
            if _is_float(o) and slots.output(i):
                o.dtype = FLOAT16
        if node.op_type == "Cast" and node.outputs[0].dtype == FLOAT16:
            node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
        if node.op_type == "ConstantOfShape" and node.outputs[0].dtype == FLOAT16:
            value = node.attributes.get("value")
            fill = value.as_tensor().numpy() if value is not None else np.zeros(1, np.float32)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(to_half(fill)))

    def _cast(self, v: ir.Value, to: ir.DataType, graph: ir.Graph, name: str | None = None) -> ir.Value:
        key = (id(graph), v, to)
        if key in self.cast_cache:
            return self.cast_cache[key]
        suffix = "fp16" if to == FLOAT16 else "fp32"
        cast = ir.node("Cast", [v], {"to": to}, name=self.fresh(f"{v.name}_to_{suffix}"))
        out = cast.outputs[0]
        out.name = name or self.fresh(f"{v.name}_{suffix}")
        out.dtype = to
        out.shape = ir.Shape(v.shape) if v.shape is not None else None
        producer = v.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, cast)
        elif len(graph):
            graph.insert_before(graph[0], cast)
        else:
            graph.append(cast)
        self.cast_cache[key] = out
        self.casts += 1
        return out

    def _float_outputs(self, graph: ir.Graph) -> None:
        """Graph outputs (subgraph outputs too) stay float32 and keep their names."""
        done: dict[ir.Value, ir.Value] = {}
        for k, v in enumerate(graph.outputs):
            if v in done:
                graph.outputs[k] = done[v]
                continue
            if v.dtype != FLOAT16 or v not in self.plan.half:
                continue
            name = v.name
            v.name = self.fresh(f"{name}_fp16")
            cached = self.cast_cache.get((id(graph), v, FLOAT))
            if cached is not None:
                cached.name = name
                graph.outputs[k] = cached
            else:
                graph.outputs[k] = self._cast(v, FLOAT, graph, name=name)
            done[v] = graph.outputs[k]


# --- what onnxruntime's CPU provider runs in float16 here ----------------------------------------


@lru_cache(maxsize=1)
def _cpu_fp16_kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider" and any("tensor(float16)" in t for t in k.type_constraints.values()):
            kernels.setdefault(("" if k.domain == "ai.onnx" else k.domain, k.op_name), []).append(tuple(k.version_range))
    return kernels


def has_fp16_cpu_kernel(domain: str, op: str, opset: int) -> bool:
    """Whether the installed onnxruntime's CPU provider has a float16 kernel for this op at this opset.

    Where it has none, onnxruntime inserts Casts around the node at load and runs its float32
    kernel (x86-64 builds have no float16 Conv, MatMul or elementwise kernels; arm64 builds have some).
    """
    domain = "" if domain == "ai.onnx" else domain
    return any(lo <= opset <= hi for lo, hi in _cpu_fp16_kernels().get((domain, op), []))


def reads_or_writes_fp16(node: ir.Node) -> bool:
    return any(v is not None and isinstance(v.type, ir.TensorType) and v.dtype == FLOAT16 for v in (*node.inputs, *node.outputs))


def fp16_kernel_coverage(model: ir.Model) -> dict[str, bool]:
    """For each op that reads or writes float16 in ``model``: does onnxruntime's CPU provider here have
    a float16 kernel for it (else it runs in float32 between Casts onnxruntime inserts)?"""
    coverage: dict[str, bool] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if reads_or_writes_fp16(node):
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            ok = has_fp16_cpu_kernel(node.domain, node.op_type, _opset(model, node))
            coverage[op] = coverage.get(op, True) and ok
    return dict(sorted(coverage.items()))
