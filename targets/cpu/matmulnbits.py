"""Lower int4 QDQ weights to ONNX Runtime's ``com.microsoft::MatMulNBits``.

    MatMul(a, DequantizeLinear(W_q, scale[, zp], axis=0, block_size=B))
    Gemm(a, DequantizeLinear(...)[, c])           (transA=0, transB=0, alpha=1, beta=1, c of shape [N])
        becomes
    MatMulNBits(a, B_packed, scales[, zp_packed][, bias=c], K, N, bits=4, block_size=B, accuracy_level)

MatMulNBits stores the weight transposed, one row per output column, in the uint4 domain:

    B_packed   uint8 [N, ceil(K/B), B/2]: code k of column n in the low nibble when k is even,
               the high nibble when odd; a partial last block is padded with 0s, as ORT pads it
    scales     [N, ceil(K/B)], A's dtype
    zp_packed  uint8 [N, ceil(ceil(K/B)/2)], two blocks per byte (low nibble first), each row
               padded to whole bytes. Absent means 8 for every block.

So int4 codes q (-8..7, zero point 0) become uint4 q + 8 with the default zero point, and uint4
codes keep their explicit zero point (uint4 with no zero point gets an explicit zero point of 0).
The bytes equal what ONNX Runtime's own DQMatMulToMatMulNBits transformer writes (scales and zero
points there are flattened to 1-D; both shapes are accepted).

Why lower here when ORT fuses at session creation: onnxruntime 1.32 fuses only some graphs. A
DequantizeLinear -> MatMul -> Relu -> MatMul chain keeps its first MatMul unfused, and MatMul -> Add
becomes Gemm first (level 1) and is then not fused; an unfused int4 DequantizeLinear is re-run on
every inference (16x slower than float32 on an 8-layer 768x3072 MLP). And the ORT format cannot
hold int4 tensors (a QDQ int4 model.ort fails to load), while it holds MatMulNBits' uint8 ones.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

MS_DOMAIN = "com.microsoft"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def pack_matmulnbits(
    q: np.ndarray, zero_point: np.ndarray | None, block_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint4 codes q [K, N] (0..15) and zero points [ceil(K/B), N] (0..15, or None for 8) ->
    (B_packed [N, ceil(K/B), B/2], zp_packed [N, ceil(ceil(K/B)/2)] or None)."""
    k, n = q.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), np.uint8)  # the padding ORT's own fusion writes
    padded[:k] = q
    codes = padded.T.reshape(n, n_blocks, block_size)
    packed = np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))
    if zero_point is None:
        return packed, None
    zp = np.zeros((n, n_blocks + n_blocks % 2), np.uint8)  # each row padded to whole bytes
    zp[:, :n_blocks] = zero_point.T
    return packed, np.ascontiguousarray(zp[:, 0::2] | (zp[:, 1::2] << 4))


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


class _DqToMatMulNBits(RewriteRuleClassBase):
    """``op_type(a, DequantizeLinear(int4 blocks))`` -> MatMulNBits, for op_type MatMul or Gemm."""

    def __init__(self, op_type: str, accuracy_level: int) -> None:
        # Matched nodes stay until dead-node removal: a DequantizeLinear shared by several
        # MatMuls is then lowered for each of them (the rewriter refuses to remove shared nodes).
        super().__init__(f"{op_type}-int4-to-MatMulNBits", remove_nodes=False)
        self.op_type = op_type
        self.accuracy_level = accuracy_level
        self._packed: dict[tuple[int, int, int], tuple[ir.Value, ir.Value, ir.Value | None]] = {}

    def setup(self):
        self._packed = {}

    def pattern(self, op, a, wq, scale):
        w = op.DequantizeLinear(wq, scale, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["w"])
        return getattr(op, self.op_type)(a, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, a: ir.Value, wq: ir.Value, scale: ir.Value, w: ir.Value, y: ir.Value, **_) -> MatchResult:
        del context
        result = MatchResult()
        dq = w.producer()
        codes, scales = wq.const_value, scale.const_value
        if codes is None or codes.dtype not in (ir.DataType.INT4, ir.DataType.UINT4) or len(codes.shape) != 2:
            return result.fail("the weight is not a constant 2-D int4/uint4 tensor")
        k, n = codes.shape
        block = _attr(dq, "block_size", 0)
        if _attr(dq, "axis", 1) not in (0, -2) or block < 16 or block & (block - 1):
            return result.fail("MatMulNBits needs blocks along K whose size is a power of two >= 16")
        if scales is None or scales.dtype not in _FLOATS or tuple(scales.shape) != (-(-k // block), n):
            return result.fail("scales are not a constant float [ceil(K/B), N]")
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if zp is not None and (zp.const_value is None or zp.const_value.dtype != codes.dtype):
            return result.fail("the zero point is not a constant of the weight's type")
        if a.dtype is not None and a.dtype != scales.dtype:
            return result.fail("A and the scales differ in dtype")
        if a.shape is not None and len(a.shape) < 2:
            return result.fail("MatMulNBits needs A of rank >= 2")
        if self.op_type == "Gemm":
            gemm = y.producer()
            if (_attr(gemm, "transA", 0), _attr(gemm, "transB", 0), _attr(gemm, "alpha", 1.0)) != (0, 0, 1.0):
                return result.fail("Gemm with transA, transB or alpha")
            if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
                c = gemm.inputs[2]
                if _attr(gemm, "beta", 1.0) != 1.0 or c.shape is None or tuple(c.shape) != (n,):
                    return result.fail("Gemm bias is not a plain [N] vector")
        return result

    def rewrite(self, op, a: ir.Value, wq: ir.Value, scale: ir.Value, w: ir.Value, y: ir.Value, **_):
        dq = w.producer()
        block = _attr(dq, "block_size", 0)
        k, n = wq.const_value.shape
        b, scales, zp = self._lowered_weight(op, wq, scale, dq.inputs[2] if len(dq.inputs) > 2 else None, block)
        bias = None
        if self.op_type == "Gemm" and len(y.producer().inputs) > 2:
            bias = y.producer().inputs[2]
        inputs = [a, b, scales, zp] + ([None, bias] if bias is not None else [])
        while inputs[-1] is None:
            inputs.pop()
        return op.MatMulNBits(
            *inputs,
            _domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=block,
            accuracy_level=self.accuracy_level,
        )

    def _lowered_weight(self, op, wq: ir.Value, scale: ir.Value, zp: ir.Value | None, block: int):
        """Packed tensors, made once per weight even if several nodes share it."""
        key = (id(wq), id(scale), id(zp))
        if key not in self._packed:
            signed = wq.const_value.dtype == ir.DataType.INT4
            q = wq.const_value.numpy().astype(np.int16)
            z = None if zp is None else zp.const_value.numpy().astype(np.int16)
            if signed:  # int4 q with zero point z is uint4 q + 8 with zero point z + 8
                q, z = q + 8, (None if z is None or not z.any() else z + 8)
            elif z is None:
                z = np.zeros((-(-q.shape[0] // block), q.shape[1]), np.int16)
            packed, packed_zp = pack_matmulnbits(q.astype(np.uint8), None if z is None else z.astype(np.uint8), block)
            scales = np.ascontiguousarray(scale.const_value.numpy().T)
            name = wq.name or "w"
            self._packed[key] = (
                op.initializer(ir.tensor(packed), name=f"{name}_nbits"),
                op.initializer(ir.tensor(scales), name=f"{name}_nbits_scales"),
                None if packed_zp is None else op.initializer(ir.tensor(packed_zp), name=f"{name}_nbits_zp"),
            )
        return self._packed[key]


def lower_int4_matmuls(model: ir.Model, accuracy_level: int = 4) -> int:
    """Rewrite every int4 DequantizeLinear -> MatMul/Gemm in ``model`` into MatMulNBits, in place.

    ``accuracy_level`` is MatMulNBits' attribute: 0 or 1 computes in float32 (the QDQ model's
    numbers), 4 lets ORT quantize A to int8 per block and use integer dot products (fastest on
    CPUs with VNNI/dotprod, at a small activation error). Returns the number of nodes rewritten.
    """
    rules = pattern.RewriteRuleSet(
        [_DqToMatMulNBits.rule("MatMul", accuracy_level), _DqToMatMulNBits.rule("Gemm", accuracy_level)]
    )
    count = rules.apply_to_model(model)
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        common.RemoveUnusedNodesPass()(model)
    return count
