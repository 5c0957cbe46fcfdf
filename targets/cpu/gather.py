"""Lower quantized embedding tables to ONNX Runtime's ``com.microsoft::GatherBlockQuantized``.

Before:  Gather(DequantizeLinear(T_q, scale[V, H/B], axis=1, block_size=B), ids)      T_q int8 or int4 [V, H]
After:   GatherBlockQuantized(T_u8, ids, scale, gather_axis=0, quantize_axis=1, block_size=B, bits=8|4)

ORT gathers the rows first and dequantizes only those; left as DequantizeLinear -> Gather it would
dequantize the whole table on every call (ORT does not constant-fold DequantizeLinear). The data is
uint8 in the kernel's default-zero-point convention: int8 codes + 128 (bits=8), or int4 codes + 8
packed two per byte along H, low nibble first (bits=4) — the ORT format cannot hold int4 tensors.
The kernel needs B a power of two >= 16 and whole blocks; other tables stay DequantizeLinear -> Gather.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

MS = "com.microsoft"


class _DqGatherToGatherBlockQuantized(pattern.RewriteRuleClassBase):
    def __init__(self) -> None:
        super().__init__("Gather-of-quantized-table-to-GatherBlockQuantized", remove_nodes=False)
        self._packed: dict[int, ir.Value] = {}

    def setup(self):
        self._packed = {}

    def pattern(self, op, q, scale, ids):
        table = op.DequantizeLinear(q, scale, _allow_other_attributes=True, _outputs=["table"])
        return op.Gather(table, ids, _allow_other_attributes=True, _outputs=["rows"])

    def check(self, context, q: ir.Value, scale: ir.Value, table: ir.Value, rows: ir.Value, **_) -> MatchResult:
        result = MatchResult()
        dq, gather = table.producer(), rows.producer()
        codes, scales = q.const_value, scale.const_value
        if codes is None or codes.dtype not in (ir.DataType.INT8, ir.DataType.INT4) or len(codes.shape) != 2:
            return result.fail("the table is not a constant 2-D int8/int4 tensor")
        block = dq.attributes.get_int("block_size", 0)
        v, h = codes.shape
        if dq.attributes.get_int("axis", 1) not in (1, -1) or block < 16 or block & (block - 1) or h % block:
            return result.fail("GatherBlockQuantized needs whole blocks along rows, of a power of two >= 16")
        if scales is None or scales.dtype != ir.DataType.FLOAT or tuple(scales.shape) != (v, h // block):
            return result.fail("scales are not a constant float32 [V, H/B]")
        if gather.attributes.get_int("axis", 0) not in (0, -2):
            return result.fail("the Gather is not along the table's rows")
        return result

    def rewrite(self, op, q: ir.Value, scale: ir.Value, ids: ir.Value, table: ir.Value, **_):
        bits = 4 if q.const_value.dtype == ir.DataType.INT4 else 8
        if id(q) not in self._packed:
            codes = q.const_value.numpy().astype(np.int16)
            if bits == 8:
                data = (codes + 128).astype(np.uint8)
            else:
                u = (codes + 8).astype(np.uint8)
                data = np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))
            self._packed[id(q)] = op.initializer(ir.tensor(data), name=f"{q.name}_gbq")
        return op.GatherBlockQuantized(
            self._packed[id(q)], ids, scale, _domain=MS,
            gather_axis=0, quantize_axis=1, block_size=table.producer().attributes.get_int("block_size"), bits=bits,
        )


def lower_quantized_gathers(model: ir.Model) -> int:
    import onnx_ir.passes.common as common

    count = pattern.RewriteRuleSet([_DqGatherToGatherBlockQuantized.rule()]).apply_to_model(model)
    if count:
        model.opset_imports.setdefault(MS, 1)
        common.RemoveUnusedNodesPass()(model)
    return count
