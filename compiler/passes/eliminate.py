"""Removal passes: nodes that compute nothing at inference time, and nodes nobody reads.

remove-identity:  x -> Identity -> Dropout(eval) -> y   becomes   x -> y
dead-code:        nodes, weights and opset imports that no graph output depends on are dropped
dedupe:           identical subexpressions and identical weights are computed/stored once
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common


class RemoveIdentity:
    name = "remove-identity"
    summary = "drop Identity and inference-mode Dropout nodes"

    def __call__(self, model: ir.Model) -> dict[str, int]:
        removed = remove_identities(model)
        common.RemoveUnusedNodesPass()(model)
        return {"removed": removed}


def remove_identities(model: ir.Model) -> int:
    """Bypass Identity and inference-mode Dropout nodes whose output is not a graph output.

    onnx_ir's IdentityEliminationPass also rewires graph outputs, which breaks on If/Loop
    bodies whose output is an outer-scope value (Silero VAD); those few nodes stay.
    """
    removed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.domain not in ("", "ai.onnx") or not (node.op_type == "Identity" or _is_inference_dropout(node)):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(node.inputs[0])
        node.graph.remove(node, safe=True)
        removed += 1
    return removed


def _is_inference_dropout(node: ir.Node) -> bool:
    """Dropout with no training_mode input (or a constant False) and an unread mask.

    onnxscript's dropout rules match the pre-opset-12 attributes, never the opset-18 inputs.
    """
    if node.op_type != "Dropout":
        return False
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is None:
        return True
    value = ir.convenience.get_const_tensor(training)
    return value is not None and not bool(value.numpy())


class DeadCode:
    name = "dead-code"
    summary = "remove nodes, weights, functions and opsets no output depends on"

    def __call__(self, model: ir.Model) -> dict[str, int]:
        weights = len(model.graph.initializers)
        for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
            p(model)
        return {"weights_removed": weights - len(model.graph.initializers)}


class Dedupe:
    name = "dedupe"
    summary = "compute identical subexpressions once and store identical weights once"

    def __call__(self, model: ir.Model) -> dict[str, int]:
        weights = len(model.graph.initializers)
        common.DeduplicateInitializersPass()(model)
        common.CommonSubexpressionEliminationPass()(model)
        common.RemoveUnusedNodesPass()(model)
        return {"weights_merged": weights - len(model.graph.initializers)}
