"""Lower dynamic-int8 MatMuls to ONNX Runtime's DynamicQuantizeMatMul.

Before:  MatMul(DequantizeLinear(DynamicQuantizeLinear(A)), DequantizeLinear(W_int8, scale[N], axis=1)) [-> Add(bias)]
         (or the weight-only form MatMul(A, DequantizeLinear(W_int8, ...)))
After:   com.microsoft::DynamicQuantizeMatMul(A, W_int8, scale, zero_point=0[N], [bias])
ORT quantizes A per call (uint8, asymmetric, per tensor: what DynamicQuantizeLinear spells out)
and runs an int8 GEMM (VNNI/dot-product kernels).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

MS = "com.microsoft"


def _weight_ok(w_q: ir.Value, scale: ir.Value) -> bool:
    if w_q.const_value is None or scale.const_value is None:
        return False
    if w_q.const_value.dtype != ir.DataType.INT8 or len(w_q.const_value.shape) != 2:
        return False
    return scale.const_value.size in (1, w_q.const_value.shape[1])


class _DynamicMatMulBase(pattern.RewriteRuleClassBase):
    def check(self, context, a: ir.Value, w_q: ir.Value, scale: ir.Value, dq_out: ir.Value, bias: ir.Value | None = None, **_) -> MatchResult:
        result = MatchResult()
        if a.producer() is not None and a.producer().op_type == "DequantizeLinear":
            return result.fail("a static int8 layer (its activation has Q/DQ): ORT's QDQ fusion runs it")
        axis = dq_out.producer().attributes.get_int("axis", 1)
        if not _weight_ok(w_q, scale) or (scale.const_value.size > 1 and axis != 1):
            return result.fail("not a per-column int8 weight")
        if bias is not None and (bias.const_value is None or tuple(bias.const_value.shape) != (w_q.const_value.shape[1],)):
            return result.fail("bias is not a constant vector of N")
        return result

    def _zero_point(self, op, scale: ir.Value) -> ir.Value:
        return op.initializer(ir.tensor(np.zeros(scale.const_value.shape, np.int8)), f"{scale.name}_zero_point")


def _quantized_per_call(op, a):
    return op.DequantizeLinear(*op.DynamicQuantizeLinear(a, _outputs=3))


class DynamicQdqMatMulBias(_DynamicMatMulBase):
    def pattern(self, op, a, w_q, scale, bias):
        w = op.DequantizeLinear(w_q, scale, _outputs=["dq_out"], _allow_other_attributes=True)
        return op.Add(op.MatMul(_quantized_per_call(op, a), w), bias)

    def rewrite(self, op, a, w_q, scale, bias, **_):
        return op.DynamicQuantizeMatMul(a, w_q, scale, self._zero_point(op, scale), bias, _domain=MS)


class DynamicQdqMatMul(_DynamicMatMulBase):
    def pattern(self, op, a, w_q, scale):
        return op.MatMul(_quantized_per_call(op, a), op.DequantizeLinear(w_q, scale, _outputs=["dq_out"], _allow_other_attributes=True))

    def rewrite(self, op, a, w_q, scale, **_):
        return op.DynamicQuantizeMatMul(a, w_q, scale, self._zero_point(op, scale), _domain=MS)


class DynamicMatMulBias(_DynamicMatMulBase):
    def pattern(self, op, a, w_q, scale, bias):
        return op.Add(op.MatMul(a, op.DequantizeLinear(w_q, scale, _outputs=["dq_out"], _allow_other_attributes=True)), bias)

    def rewrite(self, op, a, w_q, scale, bias, **_):
        return op.DynamicQuantizeMatMul(a, w_q, scale, self._zero_point(op, scale), bias, _domain=MS)


class DynamicMatMul(_DynamicMatMulBase):
    def pattern(self, op, a, w_q, scale):
        return op.MatMul(a, op.DequantizeLinear(w_q, scale, _outputs=["dq_out"], _allow_other_attributes=True))

    def rewrite(self, op, a, w_q, scale, **_):
        return op.DynamicQuantizeMatMul(a, w_q, scale, self._zero_point(op, scale), _domain=MS)


def lower_dynamic_matmuls(model: ir.Model) -> int:
    import onnx_ir.passes.common as common

    # The quantize-per-call pair is shared by the MatMuls reading one activation: leave matched
    # nodes to dead-node removal (the rewriter refuses to remove a node other matches still use).
    # Bias rules run first, on their own: the rewriter visits the MatMul before its Add, so a
    # bias-less rule in the same set would take every MatMul and leave the Adds unfused.
    count = 0
    for rules in ([DynamicQdqMatMulBias.rule(remove_nodes=False), DynamicMatMulBias.rule()],
                  [DynamicQdqMatMul.rule(remove_nodes=False), DynamicMatMul.rule()]):
        count += pattern.RewriteRuleSet(rules, commute=True).apply_to_model(model)
    if count:
        model.opset_imports.setdefault(MS, 1)
        common.RemoveUnusedNodesPass()(model)
    return count
