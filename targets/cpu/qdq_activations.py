"""Lower float activations between uint8 Q/DQ pairs to ONNX Runtime's integer kernels.

ORT has no int8 HardSwish, so a quantized conv net with HardSwish between its convs runs every
activation as a float island: DequantizeLinear, HardSigmoid, Mul, (the learnable affine's Mul
and Add), QuantizeLinear, five passes over a float tensor four times the size of the uint8 one.
HardSwish(x) = x · relu6(x + 3) / 6 is two integer kernels instead:

Before:  q -> DQ(s, z) -> HardSwish -> [Mul(a) -> Add(b)] -> Q(s_y, z_y)
After:   r6 = com.microsoft::QLinearAdd(q, s, z, 255, 3/255, 0 -> 6/255, 0)    # relu6(x + 3), saturating
         y  = com.microsoft::QLinearMul(q, s, z, r6, 1/255, 0 -> s_y/a, z_y + round(b/s_y))

Reading r6's bytes at scale 1/255 instead of 6/255 is the division by 6. The affine folds into the
output's scale and zero point. A zero point is an integer, so this needs b to be a whole number of
y's steps: int8 calibration snaps y's range so that it is (``int8.snap_shifts_to_grid``); rounding
b / s_y instead would bias y by up to half a step everywhere, which the recognizer's text suffers from.

A 256-entry lookup table (Gather on the uint8 bytes cast to int32) computes the same exactly but
measured 10× slower than the float island in ORT 1.32 (Gather copies byte by byte); the two
integer kernels measured 2.2× faster than the island (1×64×24×160, one thread).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

MS = "com.microsoft"


def _scalar(value: ir.Value | None) -> float | None:
    """The float of a one-element constant, else None."""
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _uint8_per_tensor(q_zero: ir.Value | None, scale: ir.Value) -> bool:
    return (q_zero is not None and q_zero.const_value is not None and q_zero.const_value.dtype == ir.DataType.UINT8
            and q_zero.const_value.size == 1 and _scalar(scale) is not None)


def _whole_steps(shift: float, scale: float) -> bool:
    return abs(shift / scale - round(shift / scale)) < 1e-3


def _const(op, value, dtype, name: str) -> ir.Value:
    return op.initializer(ir.tensor(np.array(value, dtype)), name)


class _Lowering(pattern.RewriteRuleClassBase):
    def _check_ends(self, s, z, s_y, z_y) -> MatchResult:
        result = MatchResult()
        if not (_uint8_per_tensor(z, s) and _uint8_per_tensor(z_y, s_y)):
            return result.fail("not uint8 per-tensor quantization on both ends")
        return result


class HardSwishAffine(_Lowering):
    """q -> DQ -> HardSwish -> Mul(a) -> Add(b) -> Q  (PP-LCNetV3's activation + learnable affine)."""

    def pattern(self, op, q, s, z, a, b, s_y, z_y):
        h = op.HardSwish(op.DequantizeLinear(q, s, z))
        return op.QuantizeLinear(op.Add(op.Mul(h, a), b), s_y, z_y)

    def check(self, context, q, s, z, a, b, s_y, z_y, **_) -> MatchResult:
        result = self._check_ends(s, z, s_y, z_y)
        if result and (_scalar(a) is None or _scalar(b) is None or _scalar(a) <= 0):
            return result.fail("the affine after HardSwish is not a positive scalar gain and a scalar shift")
        if result and not _whole_steps(_scalar(b), _scalar(s_y)):
            return result.fail("the shift is not a whole number of output steps (int8 snaps ranges so that it is)")
        if result and not 0 <= int(_scalar(z_y)) + round(_scalar(b) / _scalar(s_y)) <= 255:
            return result.fail("the shift moves the zero point out of uint8")
        return result

    def rewrite(self, op, q, s, z, a, b, s_y, z_y, **_):
        # Q(a·h + b, s_y, z_y) = Q(h, s_y / a, z_y + b / s_y), exactly since b / s_y is whole
        scale = _const(op, _scalar(s_y) / _scalar(a), np.float32, f"{s_y.name}_over_gain")
        zero = _const(op, int(_scalar(z_y)) + round(_scalar(b) / _scalar(s_y)), np.uint8, f"{z_y.name}_shifted")
        return _hard_swish(op, q, s, z, scale, zero)


class HardSwish(_Lowering):
    """q -> DQ -> HardSwish -> Q."""

    def pattern(self, op, q, s, z, s_y, z_y):
        return op.QuantizeLinear(op.HardSwish(op.DequantizeLinear(q, s, z)), s_y, z_y)

    def check(self, context, q, s, z, s_y, z_y, **_) -> MatchResult:
        return self._check_ends(s, z, s_y, z_y)

    def rewrite(self, op, q, s, z, s_y, z_y, **_):
        return _hard_swish(op, q, s, z, s_y, z_y)


def _hard_swish(op, q, s, z, s_y, z_y):
    tag = f"{q.name}_hardswish"
    zero = _const(op, 0, np.uint8, f"{tag}_zero")
    relu6 = op.QLinearAdd(q, s, z, _const(op, 255, np.uint8, f"{tag}_255"), _const(op, 3 / 255, np.float32, f"{tag}_3_over_255"), zero,
                          _const(op, 6 / 255, np.float32, f"{tag}_6_over_255"), zero, _domain=MS)
    return op.QLinearMul(q, s, z, relu6, _const(op, 1 / 255, np.float32, f"{tag}_1_over_255"), zero, s_y, z_y, _domain=MS)


RULES = pattern.RewriteRuleSet([HardSwishAffine.rule(), HardSwish.rule()], commute=True)


def lower_quantized_activations(model: ir.Model) -> int:
    """Rewrite the float activation islands of a uint8 QDQ graph (in place); returns how many."""
    count = RULES.apply_to_model(model)
    if count:
        model.opset_imports.setdefault(MS, 1)
    return count
