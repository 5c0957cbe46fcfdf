"""Embedding tables in int8/int4 blocks: the QDQ form, and the cpu lowering to GatherBlockQuantized computing the same rows."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgec.compiler.quantize import gather
from edgec.runtime import ort as ort_backend
from edgec.targets.cpu.gather import lower_quantized_gathers


def _embedding_model(table: np.ndarray) -> ir.Model:
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["batch", "seq"]))
    weight = ir.val("table", const_value=ir.tensor(table, name="table"))
    weight.type, weight.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(table.shape)
    node = ir.node("Gather", [weight, ids], name="embed")
    node.outputs[0].name, node.outputs[0].dtype = "rows", ir.DataType.FLOAT
    graph = ir.Graph([ids], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 18})
    return ir.Model(graph, ir_version=9)


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    return ort_backend.run(ort_backend.create_session_from_proto(ir.serde.serialize_model(model)), {"ids": ids})["rows"]


@pytest.mark.parametrize("bits, block, max_rel", [(8, gather.INT8_TABLE_BLOCK, 0.01), (4, 32, 0.15)])
def test_table_rows_survive_quantization_and_lowering(bits, block, max_rel):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1000, 256)).astype(np.float32)
    ids = rng.integers(0, 1000, (3, 17)).astype(np.int64)
    model = _embedding_model(table)
    assert [n.name for n in gather.quantizable_tables(model)] == ["embed"]
    assert gather.quantize_tables(model, {"embed": bits}, int4_block_size=block) == 1
    dq = model.graph.node(0)
    assert dq.op_type == "DequantizeLinear" and dq.attributes.get_int("block_size") == block
    assert dq.inputs[0].const_value.dtype == (ir.DataType.INT8 if bits == 8 else ir.DataType.INT4)
    assert "table" not in model.graph.initializers  # the float table is gone
    qdq = _run(model, ids)
    error = np.linalg.norm(qdq - table[ids]) / np.linalg.norm(table[ids])
    assert error < max_rel
    assert lower_quantized_gathers(model) == 1
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized"]
    np.testing.assert_array_equal(_run(model, ids), qdq)  # the kernel computes exactly what the QDQ form says


def test_tables_the_kernel_cannot_take_stay_dequantize_gather():
    table = np.random.default_rng(1).standard_normal((50, 40)).astype(np.float32)  # 40 is not a whole number of 32-blocks
    model = _embedding_model(table)
    gather.quantize_tables(model, {"embed": 4}, int4_block_size=32)
    assert lower_quantized_gathers(model) == 0
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "Gather"]
    ids = np.array([[0, 49]], np.int64)
    assert np.linalg.norm(_run(model, ids) - table[ids]) / np.linalg.norm(table[ids]) < 0.15
