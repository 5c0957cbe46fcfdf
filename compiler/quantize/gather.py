"""Embedding tables (constant ``Gather`` data) in int8 or int4 blocks, in the target-neutral QDQ form.

    Gather(T, ids)     becomes     Gather(DequantizeLinear(T_q, scale[V, H/B], axis=1, block_size=B), ids)

    T        [V, H] float32 table, gathered along axis 0 (rows are tokens)
    T_q      [V, H] int8 (-127..127) or int4 (-8..7, the grid of ``int4.quantize_blocks``), symmetric
    scale    [V, ceil(H/B)] float32: blocks run along each row, so a looked-up row needs only its own scales

A table is read a few rows at a time, so its codes never pay a per-call dequantization on a backend
that gathers first and dequantizes the rows it took (ONNX Runtime's GatherBlockQuantized, which
needs B a power of two >= 16; hence int8 tables use blocks of 128 rather than whole rows of 384).
Blocked DequantizeLinear needs ONNX opset 21, which ``int4.raise_opset`` brings the model to.
"""

from __future__ import annotations

from typing import Collection

import numpy as np
import onnx_ir as ir

from edgec.compiler.quantize.int4 import _drop_if_unused, _unique_value_name, quantize_blocks, raise_opset

#: int8 table blocks along a row: large enough that scales cost 3 % of the codes
INT8_TABLE_BLOCK = 128


def quantizable_tables(model: ir.Model) -> list[ir.Node]:
    """Gathers along axis 0 of a constant 2-D float32 table, in the main graph."""
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = node.inputs[0]
        tensor = None if table is None or table.is_graph_input() else ir.convenience.get_const_tensor(table)
        axis = node.attributes.get_int("axis", 0)
        if tensor is not None and tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == 2 and axis in (0, -2):
            found.append(node)
    return found


def quantize_table(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[V, H] float32 -> (codes [V, H] int8, scale [V, ceil(H/B)] float32), symmetric, blocks along H."""
    if bits == 4:
        wq = quantize_blocks(np.ascontiguousarray(table.T), block_size)  # blocks run along K = H
        return np.ascontiguousarray(wq.q.T), np.ascontiguousarray(wq.scale.T.astype(np.float32))
    v, h = table.shape
    n_blocks = -(-h // block_size)
    padded = np.zeros((v, n_blocks * block_size), np.float32)
    padded[:, :h] = table
    blocks = padded.reshape(v, n_blocks, block_size)
    scale = np.abs(blocks).max(axis=2) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int8).reshape(v, -1)[:, :h]
    return np.ascontiguousarray(q), scale


def quantize_tables(model: ir.Model, bits_by_node: dict[str, int], int4_block_size: int, cache: dict | None = None) -> int:
    """Put the tables of the named Gathers (node name -> 8 or 4 bits) behind a DequantizeLinear, in place.

    ``cache`` (table name -> codes) lets repeated builds of the same float model quantize each table once.
    """
    cache = {} if cache is None else cache
    if not any(n.name in bits_by_node for n in quantizable_tables(model)):
        return 0
    raise_opset(model)
    graph = model.graph
    done: dict[tuple[int, int], ir.Value] = {}  # a table shared by several Gathers is stored once
    originals = []
    for node in quantizable_tables(model):  # found again: raising the opset may rebuild the graph
        if node.name not in bits_by_node:
            continue
        bits = bits_by_node[node.name]
        table = node.inputs[0]
        key = (id(table), bits)
        if key not in done:
            block = int4_block_size if bits == 4 else INT8_TABLE_BLOCK
            if (table.name, bits, block) not in cache:
                cache[(table.name, bits, block)] = quantize_table(ir.convenience.get_const_tensor(table).numpy(), bits, block)
            q, scale = cache[(table.name, bits, block)]
            dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
            q_value = _initializer(graph, f"{table.name}_q{bits}", ir.Tensor(q, dtype=dtype))
            s_value = _initializer(graph, f"{table.name}_scale", ir.tensor(scale))
            dq = ir.node("DequantizeLinear", [q_value, s_value], {"axis": 1, "block_size": block}, name=f"{node.name}/dq{bits}")
            dq.outputs[0].name = _unique_value_name(graph, f"{table.name}_dq")
            dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(q.shape)
            graph.insert_before(node, dq)
            done[key] = dq.outputs[0]
        node.replace_input_with(0, done[key])
        originals.append(table)
    for table in originals:
        _drop_if_unused(graph, table)
    return len(originals)


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.val(_unique_value_name(graph, name), const_value=tensor)
    value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)
    graph.register_initializer(value)
    return value


def fold_for_evaluation(model: ir.Model) -> ir.Model:
    """The quantized tables as float constants again (in place): the same numbers, without ORT
    dequantizing a whole table on every call while the accuracy budget runs the model many times."""
    for node in list(model.graph):
        dq = node.inputs[0].producer() if node.op_type == "Gather" and node.inputs[0] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) != 2 or dq.inputs[1].const_value is None:
            continue
        q, scale = dq.inputs[0].const_value.numpy().astype(np.float32), dq.inputs[1].const_value.numpy()
        block = dq.attributes.get_int("block_size", 0)
        table = q * np.repeat(scale, block, axis=1)[:, : q.shape[1]]
        node.replace_input_with(0, _initializer(model.graph, f"{dq.outputs[0].name}_folded", ir.tensor(table.astype(np.float32))))
    return model
