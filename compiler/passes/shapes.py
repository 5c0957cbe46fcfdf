"""Shape cleanup: reshape/transpose/cast/squeeze chains that do nothing or can be one node.

Reshape(Reshape(x, s1), s2)        becomes  Reshape(x, s2)
Transpose(Transpose(x, p), p⁻¹)    becomes  x
Cast(x, to=dtype(x)), Expand(x, shape(x)), Slice chains, Unsqueeze(Unsqueeze) ...
Reshape shapes computed from static dims become constants.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules.common import (
    collapse_slice2_rule,
    collapse_slice_rule,
    materialize_reshape_shape_rule,
)
from onnxscript.rewriter.rules.common._basic_rules import basic_optimization_rules

from edgec.compiler.passes._rules import RulesPass
from edgec.compiler.passes.eliminate import remove_identities


class ShapeCleanup(RulesPass):
    name = "shape-cleanup"
    summary = "merge or drop no-op Reshape/Transpose/Cast/Expand/Slice/Unsqueeze chains"

    @property
    def rules(self):  # basic_optimization_rules() builds a fresh rule set each call
        return [*basic_optimization_rules().rules, collapse_slice_rule, collapse_slice2_rule, materialize_reshape_shape_rule]

    def __call__(self, model: ir.Model) -> dict[str, int]:
        # The no-op rules leave an Identity behind, and remove-identity has already run.
        changes = super().__call__(model)
        remove_identities(model)
        return changes
