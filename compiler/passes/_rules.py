"""Shared plumbing for passes that are sets of onnxscript rewriter rules."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern


class RulesPass:
    """A pass made of rewrite rules (pattern -> replacement), followed by dead-node removal."""

    name = ""
    summary = ""
    rules: list[pattern.RewriteRule] = []
    commute = False  #: also match commuted forms (Mul(a, x) as well as Mul(x, a))

    def __call__(self, model: ir.Model) -> dict[str, int]:
        applied = pattern.RewriteRuleSet(self.rules, commute=self.commute).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
        return {"rewrites": applied}
