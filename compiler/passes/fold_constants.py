"""Constant folding: evaluate every node whose inputs are all known and store the result as a weight.

Before:  W0 -> Transpose -> Conv     Shape(x) -> Gather -> Reshape (x has a static shape)
After:   W0ᵀ -> Conv                 Reshape with a constant shape

Also folds ``ConstantOfShape`` (onnxscript keeps it by default to save bytes; a device
compiler wants the weight it makes) and lifts ``Constant`` nodes into initializers.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

# Element limits: fold weight preprocessing (transposes, reshapes of weights) but never
# materialize a huge tensor that a cheap op would compute at run time.
INPUT_SIZE_LIMIT = 1 << 22
OUTPUT_SIZE_LIMIT = 1 << 22


def _should_fold(node: ir.Node) -> bool | None:
    return True if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") else None


class FoldConstants:
    name = "fold-constants"
    summary = "evaluate nodes with constant inputs; ConstantOfShape and Constant become weights"

    def __call__(self, model: ir.Model) -> dict[str, int]:
        before = len(model.graph.initializers)
        fold_constants(
            model,
            onnx_shape_inference=True,
            input_size_limit=INPUT_SIZE_LIMIT,
            output_size_limit=OUTPUT_SIZE_LIMIT,
            should_fold=_should_fold,
        )
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.RemoveUnusedNodesPass()(model)
        return {"weights_added": len(model.graph.initializers) - before}
