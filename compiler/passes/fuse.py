"""Fusion passes: fewer, bigger nodes where every runtime has a kernel for the bigger one.

fold-batchnorm:     Conv -> BatchNormalization         becomes  Conv (scaled W, shifted B)
                    (also ConvTranspose, Gemm)
fuse-activations:   x * Clip(x + 3, 0, 6) / 6           becomes  HardSwish(x)
                    Add(x,3) -> Clip -> Div(6)          becomes  HardSigmoid(x)
                    Relu/Clip chains                    become   one Clip
                    Pad -> Conv                         becomes  Conv(pads)
ORT, Core ML and TFLite each run HardSwish as one kernel (ORT does not fuse it from the
four-node form itself), and fold a following Relu/Clip into Conv.
"""

from __future__ import annotations

from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
    fuse_hardswish_rules,
    fuse_pad_into_conv_rule,
    max_min_rule,
    min_max_rule,
    normalize_pad_format_conv_rule,
    successive_clip_relu_rule,
    successive_clip_rule,
    successive_relu_clip_rule,
    successive_relu_rule,
)

from edgec.compiler.passes._rules import RulesPass


class FoldBatchNorm(RulesPass):
    name = "fold-batchnorm"
    summary = "fold BatchNormalization into the Conv, ConvTranspose or Gemm before it"
    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]


class FuseActivations(RulesPass):
    name = "fuse-activations"
    summary = "HardSwish/HardSigmoid from their elementwise forms, Relu/Clip/Min/Max chains, Pad into Conv"
    rules = [
        *fuse_hardswish_rules(),
        successive_relu_rule,
        successive_clip_rule,
        successive_clip_relu_rule,
        successive_relu_clip_rule,
        min_max_rule,
        max_min_rule,
        normalize_pad_format_conv_rule,
        fuse_pad_into_conv_rule,
    ]
