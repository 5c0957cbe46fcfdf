"""fold-scale-shift: a constant per-channel scale and/or shift after a Conv goes into its weights.

Before:  x -> Conv(W, B) -> Mul(a) -> Add(b)         (a, b scalars or one value per output channel)
After:   x -> Conv(W·a, B·a + b)
Before:  x -> Mul(a) -> Add(b) -> Conv(W, B)         (unpadded, ungrouped Conv; a, b per input channel)
After:   x -> Conv(W·a, B + Σ W·b)

PP-LCNet (the PP-OCRv4 backbone) puts a learnable scalar affine after every Conv; left as
Mul/Add they cost a memory pass each and, in ORT, break its NCHWc layout chain with reorders.
onnxscript's ConvAffineFusion covers only scalar scale *and* shift on a Conv with a bias.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from edgec.compiler.passes._rules import RulesPass


def _per_channel(value: ir.Value, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a (channels,) vector if it is constant and broadcasts along the channel axis only."""
    if value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.size == 1:
        return np.full(channels, array.reshape(()), dtype=array.dtype)
    # Broadcast against (N, C, *spatial): the channel axis is rank-1 from the right, all others 1.
    shape = (1,) * (rank - array.ndim) + array.shape if array.ndim <= rank else None
    if shape is None or shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return array.reshape(channels)


class _ConvScaleShift(pattern.RewriteRuleClassBase):
    has_scale = True
    has_shift = True

    def check(self, context, conv_out: ir.Value, scale: ir.Value | None = None, shift: ir.Value | None = None, **_) -> MatchResult:
        result = MatchResult()
        conv = conv_out.producer()
        w = conv.inputs[1]
        if w.const_value is None or (len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].const_value is None):
            return result.fail("Conv weight and bias must be constants")
        channels, rank = w.const_value.shape[0], len(w.const_value.shape)
        for operand in (scale, shift):
            if operand is not None and _per_channel(operand, channels, rank) is None:
                return result.fail("scale/shift must be constant and per-channel")
        return result

    def rewrite(self, op, x: ir.Value, conv_out: ir.Value, scale: ir.Value | None = None, shift: ir.Value | None = None, **_):
        conv = conv_out.producer()
        w = conv.inputs[1].const_value.numpy()
        channels, rank = w.shape[0], w.ndim
        bias = conv.inputs[2].const_value.numpy() if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros(channels, w.dtype)
        a = _per_channel(scale, channels, rank) if scale is not None else np.ones(channels, w.dtype)
        b = _per_channel(shift, channels, rank) if shift is not None else np.zeros(channels, w.dtype)
        new_w = op.initializer(ir.tensor((w * a.reshape((-1,) + (1,) * (rank - 1))).astype(w.dtype)), conv.inputs[1].name + "_scaled")
        new_b = op.initializer(ir.tensor((bias * a + b).astype(w.dtype)), f"{conv.inputs[1].name}_bias_shifted")
        return op.Conv(x, new_w, new_b, **conv.attributes)


class ConvScaleShift(_ConvScaleShift):
    def pattern(self, op, x, scale, shift):
        return op.Conv(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["conv_out"]) * scale + shift


class ConvScale(_ConvScaleShift):
    def pattern(self, op, x, scale):
        return op.Conv(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["conv_out"]) * scale


class ConvShift(_ConvScaleShift):
    def pattern(self, op, x, shift):
        return op.Conv(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["conv_out"]) + shift


class ScaleShiftConv(pattern.RewriteRuleClassBase):
    """Mul(a) -> Add(b) -> Conv without padding or groups: W'[o,i] = W[o,i]·a[i], B' = B + Σ W[o,i]·b[i].

    With padding the zeros added at the border would not be scaled and shifted, so it must be 0.
    """

    def pattern(self, op, x, scale, shift):
        return op.Conv(x * scale + shift, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["conv_out"])

    def check(self, context, conv_out: ir.Value, scale: ir.Value, shift: ir.Value, **_) -> MatchResult:
        result = MatchResult()
        conv = conv_out.producer()
        w = conv.inputs[1]
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if w.const_value is None or (bias is not None and bias.const_value is None):
            return result.fail("Conv weight and bias must be constants")
        attrs = conv.attributes
        if attrs.get_int("group", 1) != 1 or attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return result.fail("grouped or auto-padded Conv")
        if any(attrs.get_ints("pads", [0])):
            return result.fail("padded Conv: border zeros would not be scaled and shifted")
        in_channels, rank = w.const_value.shape[1], len(w.const_value.shape)
        if _per_channel(scale, in_channels, rank) is None or _per_channel(shift, in_channels, rank) is None:
            return result.fail("scale/shift must be constant and per-channel")
        return result

    def rewrite(self, op, x: ir.Value, conv_out: ir.Value, scale: ir.Value, shift: ir.Value, **_):
        conv = conv_out.producer()
        w = conv.inputs[1].const_value.numpy()
        rank, in_channels = w.ndim, w.shape[1]
        bias = conv.inputs[2].const_value.numpy() if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros(w.shape[0], w.dtype)
        a = _per_channel(scale, in_channels, rank).reshape((1, -1) + (1,) * (rank - 2))
        b = _per_channel(shift, in_channels, rank).reshape((1, -1) + (1,) * (rank - 2))
        new_w = op.initializer(ir.tensor((w * a).astype(w.dtype)), conv.inputs[1].name + "_prescaled")
        new_b = op.initializer(ir.tensor((bias + (w * b).sum(axis=tuple(range(1, rank)))).astype(w.dtype)), conv.inputs[1].name + "_preshifted")
        return op.Conv(x, new_w, new_b, **conv.attributes)


class FoldScaleShift(RulesPass):
    name = "fold-scale-shift"
    summary = "fold a constant per-channel Mul/Add after a Conv into its weights and bias"
    commute = True
    # Longest pattern first, so Conv*a+b folds whole rather than as Conv*a then +b.
    rules = [ConvScaleShift.rule(), ConvScale.rule(), ConvShift.rule(), ScaleShiftConv.rule()]
