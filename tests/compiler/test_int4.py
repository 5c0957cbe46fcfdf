"""int4 block-wise weights: the target-neutral QDQ form (``edgec.compiler.quantize.int4``) and its
lowering to ONNX Runtime's MatMulNBits for the cpu target (``edgec.targets.cpu.matmulnbits``)."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.compiler.quantize.int4 import quantize_blocks, quantize_int4
from edgec.errors import InputError
from edgec.targets.cpu.matmulnbits import lower_int4_matmuls, pack_matmulnbits

N = 48
BLOCK = 32


# --- helpers -----------------------------------------------------------------------------------


def weight(k: int, n: int = N, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(dtype)


def matmul_model(w: np.ndarray, rows: int = 3, opset: int = 18) -> ir.Model:
    """y = x @ W with W an initializer; x [rows, K]."""
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", elem, [rows, w.shape[0]])],
        [helper.make_tensor_value_info("y", elem, [rows, w.shape[1]])],
        [numpy_helper.from_array(w, "W")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def run(model: ir.Model, feeds: dict, optimize: bool = False) -> np.ndarray:
    """Output 0 in ORT. Unoptimized by default: ORT would otherwise fuse DequantizeLinear -> MatMul
    into MatMulNBits itself (at accuracy level 4) and the QDQ reference would not be plain QDQ."""
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def full_check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float32) - b) / np.linalg.norm(b))


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.fixture(scope="module")
def ocr_rec_weights() -> dict[str, np.ndarray]:
    """The constant MatMul weights of the PP-OCRv4 recognizer (9 of its 13 MatMuls; the rest are attention)."""
    from edgec.models.catalogue import model_path

    proto = onnx.load(model_path("ocr-rec"))
    consts = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    consts.update({t.name: t for t in proto.graph.initializer})
    weights = {
        n.name: numpy_helper.to_array(consts[n.input[1]])
        for n in proto.graph.node
        if n.op_type == "MatMul" and n.input[1] in consts
    }
    assert len(weights) == 9
    return weights


# --- the QDQ form ------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k", [64, 96, 100])
def test_qdq_model_checks_runs_and_matches_its_numpy_reference(k, symmetric):
    w = weight(k)
    model = matmul_model(w)
    stats = quantize_int4(model, block_size=BLOCK, symmetric=symmetric)

    full_check(model)
    assert stats["layers"] == 1 and stats["opset"] == "18 -> 21"
    assert model.opset_imports[""] == 21 and ops(model) == {"DequantizeLinear": 1, "MatMul": 1}
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].value == 0 and dq.attributes["block_size"].value == BLOCK
    q, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
    assert q.dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
    assert tuple(scale.shape) == (-(-k // BLOCK), N) and scale.dtype == ir.DataType.FLOAT
    assert (len(dq.inputs) == 3) != symmetric  # a uint4 zero point only when asymmetric
    assert "W" not in model.graph.initializers  # the float weight is gone

    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    y = run(model, {"x": x})
    # ORT's DequantizeLinear-21 (partial last block included) computes what the numpy reference does.
    reference = x @ quantize_blocks(w, BLOCK, symmetric=symmetric).dequantize()
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
    # 4-bit weights on Gaussian data: ~8-9 % weight error, about the same in the outputs.
    assert 0.03 < stats["errors"]["mm"] < 0.1
    assert rel(y, x @ w) < 0.15


def test_symmetric_grid_maps_the_largest_magnitude_to_minus_8():
    w = np.zeros((32, 2), np.float32)
    w[:, 0], w[:, 1] = np.linspace(-1, 3, 32), np.linspace(-3, 1, 32)
    wq = quantize_blocks(w, 32, symmetric=True)
    np.testing.assert_allclose(wq.scale[0], [3 / -8, 3 / 8])  # the scale carries the extreme's sign
    assert wq.q[-1, 0] == -8 and wq.q[0, 1] == -8 and wq.q.min() >= -8 and wq.q.max() <= 7


def test_asymmetric_zero_points_are_uint4_and_represent_zero_exactly():
    w = weight(96, seed=3) + 0.5  # ranges off-centre, so zero points differ from 8
    wq = quantize_blocks(w, BLOCK, symmetric=False, method="hqq")
    assert wq.zero_point.min() >= 0 and wq.zero_point.max() <= 15 and len(np.unique(wq.zero_point)) > 1
    assert wq.q.min() >= 0 and wq.q.max() <= 15


def test_bytes_shrink_about_6_to_7_times_for_fp32_weights():
    for symmetric, low, high in [(True, 6.3, 6.5), (False, 6.1, 6.3)]:
        stats = quantize_int4(matmul_model(weight(256, 256)), symmetric=symmetric)
        assert stats["bytes_before"] == 256 * 256 * 4
        # 4 bits per weight + a 32-bit scale per 32 weights (+ a 4-bit zero point): 5 (5.125) bits.
        assert low < stats["bytes_before"] / stats["bytes_after"] < high


def test_float16_weights_keep_float16_scales():
    w = weight(100, dtype=np.float16)
    model = matmul_model(w)
    quantize_int4(model, method="hqq")
    full_check(model)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    x = np.random.default_rng(1).standard_normal((3, 100)).astype(np.float16)
    assert run(model, {"x": x}).dtype == np.float16
    assert rel(run(model, {"x": x}), x.astype(np.float32) @ w.astype(np.float32)) < 0.15


def test_exclude_min_elements_and_activation_matmuls_stay_float():
    shapes = [("A", 64, 64), ("B", 64, 16), ("C", 16, 64)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "A"], ["a"], name="keep"),
            helper.make_node("MatMul", ["a", "B"], ["b"], name="narrow"),
            helper.make_node("MatMul", ["b", "C"], ["c"], name="short"),  # K=16: one partial block
            helper.make_node("MatMul", ["c", "x_t"], ["y"], name="scores"),  # activations on both sides
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in [("x", [4, 64]), ("x_t", [64, 4])]],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(weight(k, n, s), name) for s, (name, k, n) in enumerate(shapes)],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    stats = quantize_int4(model, exclude={"keep"}, min_elements=64 * 16 + 1)
    assert stats["layers"] == 0 and set(stats["skipped"]) == {"keep", "narrow", "short"}
    assert stats["skipped"]["keep"] == "excluded"
    assert model.opset_imports[""] == 18  # nothing quantized, nothing changed
    stats = quantize_int4(model, exclude={"keep"})
    assert stats["layers"] == 2 and list(stats["errors"]) == ["narrow", "short"]
    assert "A" in model.graph.initializers and ops(model) == {"MatMul": 4, "DequantizeLinear": 2}
    full_check(model)


def two_matmuls_sharing_a_weight() -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", [a, "W"], [y], name=name) for a, y, name in [("x", "h", "m1"), ("h", "y", "m2")]],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(weight(64, 64), "W")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_a_shared_weight_is_quantized_once():
    model, w = two_matmuls_sharing_a_weight(), weight(64, 64)
    stats = quantize_int4(model)
    assert stats["layers"] == 2 and stats["bytes_before"] == w.nbytes
    assert ops(model)["DequantizeLinear"] == 2 and sorted(model.graph.initializers) == ["W_q4", "W_scale"]
    x = np.ones((2, 64), np.float32)
    qdq = run(model, {"x": x})
    assert lower_int4_matmuls(model, accuracy_level=0) == 2
    assert sum(1 for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8) == 1
    np.testing.assert_allclose(run(model, {"x": x}), qdq, rtol=1e-4, atol=1e-4)


def test_bad_options_are_usage_errors():
    with pytest.raises(InputError, match="method"):
        quantize_int4(matmul_model(weight(64)), method="gptq")
    with pytest.raises(InputError, match="power of two"):
        quantize_int4(matmul_model(weight(64)), block_size=24)


def test_an_older_opset_is_converted(caplog):
    caplog.set_level(logging.ERROR)  # onnxscript warns that it falls back to onnx's converter below 18
    model = matmul_model(weight(64), opset=13)
    stats = quantize_int4(model)
    assert stats["opset"] == "13 -> 21" and model.opset_imports[""] == 21
    full_check(model)


# --- HQQ vs RTN --------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_hqq_has_less_weight_error_than_rtn_on_real_weights(ocr_rec_weights, symmetric):
    for name, w in ocr_rec_weights.items():
        rtn = quantize_blocks(w, BLOCK, symmetric=symmetric, method="rtn")
        hqq = quantize_blocks(w, BLOCK, symmetric=symmetric, method="hqq")
        e_rtn, e_hqq = rel(rtn.dequantize(), w), rel(hqq.dequantize(), w)
        assert e_hqq < 0.98 * e_rtn, (name, e_rtn, e_hqq)


def test_hqq_has_less_weight_error_than_rtn_on_heavy_tails():
    w = (np.random.default_rng(0).standard_t(3, (512, 256)) * 0.02).astype(np.float32)
    for symmetric in (True, False):
        e_rtn = rel(quantize_blocks(w, BLOCK, symmetric=symmetric).dequantize(), w)
        e_hqq = rel(quantize_blocks(w, BLOCK, symmetric=symmetric, method="hqq").dequantize(), w)
        assert e_hqq < 0.99 * e_rtn


# --- lowering to MatMulNBits -------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k", [64, 96, 100])
def test_matmulnbits_gives_the_qdq_models_outputs(k, symmetric):
    model = matmul_model(weight(k))
    quantize_int4(model, symmetric=symmetric, method="hqq")
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    qdq = run(model, {"x": x})

    exact, fast = copy(model), copy(model)
    assert lower_int4_matmuls(exact, accuracy_level=0) == 1
    onnx.checker.check_model(ir.serde.serialize_model(exact))
    assert ops(exact) == {"MatMulNBits": 1} and exact.opset_imports["com.microsoft"] == 1
    dtypes = {v.const_value.dtype for v in exact.graph.initializers.values()}
    assert dtypes == {ir.DataType.UINT8, ir.DataType.FLOAT}  # no int4 left: packed bytes and scales
    node = next(iter(exact.graph))
    assert {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size", "accuracy_level")} == {
        "K": k, "N": N, "bits": 4, "block_size": BLOCK, "accuracy_level": 0
    }
    np.testing.assert_allclose(run(exact, {"x": x}), qdq, rtol=1e-4, atol=1e-5)

    # Level 4 quantizes A to int8 per block inside the kernel: a small activation error on top.
    lower_int4_matmuls(fast)
    assert rel(run(fast, {"x": x}), qdq) < 2e-2


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_packing_is_byte_identical_to_onnxruntimes_own_fusion(tmp_path, symmetric):
    """ORT fuses a lone DequantizeLinear(int4) -> MatMul into MatMulNBits at session creation;
    its optimized graph is the reference for the layout (nibble order, transposition, zero points)."""
    model = matmul_model(weight(100))
    quantize_int4(model, symmetric=symmetric)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    theirs = onnx.load(tmp_path / "ort.onnx")
    assert [n.op_type for n in theirs.graph.node] == ["MatMulNBits"]
    their_inputs = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    theirs_by_position = [their_inputs[i] for i in theirs.graph.node[0].input[1:]]

    lower_int4_matmuls(model)
    ours = ir.serde.serialize_model(model)
    our_inputs = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    ours_by_position = [our_inputs[i] for i in ours.graph.node[0].input[1:]]
    assert len(ours_by_position) == len(theirs_by_position) == (2 if symmetric else 3)
    for a, b in zip(ours_by_position, theirs_by_position):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # ORT flattens scales/zp to 1-D


def test_pack_matmulnbits_layout():
    q = np.arange(40 * 2, dtype=np.uint8).reshape(40, 2) % 16  # K=40: blocks of 32 + 8
    zp = np.array([[1, 2], [3, 4]], np.uint8)
    packed, packed_zp = pack_matmulnbits(q, zp, 32)
    assert packed.shape == (2, 2, 16) and packed_zp.shape == (2, 1)
    assert packed[0, 0, 0] == q[0, 0] | q[1, 0] << 4  # even k in the low nibble
    assert packed[1, 1, 3] == q[38, 1] | q[39, 1] << 4 and not packed[1, 1, 4:].any()
    assert list(packed_zp[:, 0]) == [1 | 3 << 4, 2 | 4 << 4]  # blocks of one column share a byte


def test_an_mlp_is_lowered_whole_and_saves_in_ort_format(tmp_path):
    """MatMul -> Relu -> MatMul -> Add: a chain onnxruntime 1.32 does not fuse by itself, and the ORT
    format cannot store int4 tensors; after lowering no DequantizeLinear is left and model.ort runs."""
    from edgec.runtime import ort as ort_backend

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["d"], name="down"),
            helper.make_node("Add", ["x", "d"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(weight(64, 256, 1), "W1"), numpy_helper.from_array(weight(256, 64, 2), "W2")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    quantize_int4(model, symmetric=False)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    qdq = run(model, {"x": x})
    assert lower_int4_matmuls(model, accuracy_level=0) == 2
    assert ops(model) == {"MatMulNBits": 2, "Relu": 1, "Add": 1}
    np.testing.assert_allclose(run(model, {"x": x}, optimize=True), qdq, rtol=1e-4, atol=1e-4)

    ir.save(model, tmp_path / "model.onnx")
    ort_backend.write_ort_format(tmp_path / "model.onnx", tmp_path / "model.ort")
    session = ort.InferenceSession(str(tmp_path / "model.ort"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], qdq, rtol=1e-4, atol=1e-4)


def test_a_dequantize_shared_by_two_matmuls_is_lowered_for_both():
    model = two_matmuls_sharing_a_weight()
    quantize_int4(model)
    first, second = (n for n in model.graph if n.op_type == "DequantizeLinear")
    model.graph.node("m2").replace_input_with(1, first.outputs[0])  # one DequantizeLinear, two consumers
    model.graph.remove(second)
    assert lower_int4_matmuls(model) == 2 and ops(model) == {"MatMulNBits": 2}


def test_gemm_with_transposed_weight_and_bias():
    w = weight(96, N)
    bias = np.random.default_rng(2).standard_normal(N).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "Wt", "c"], ["y"], name="fc", transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt"), numpy_helper.from_array(bias, "c")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert quantize_int4(model)["layers"] == 1
    full_check(model)
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.attributes["transB"].value == 0  # the stored weight is [K, N] like every MatMul's
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    qdq = run(model, {"x": x})
    assert rel(qdq, x @ w + bias) < 0.15
    assert lower_int4_matmuls(model, accuracy_level=0) == 1 and ops(model) == {"MatMulNBits": 1}
    np.testing.assert_allclose(run(model, {"x": x}), qdq, rtol=1e-4, atol=1e-4)


def test_real_recognizer_quantized_and_lowered(ocr_rec_weights):
    """PP-OCRv4 rec: all 9 weight MatMuls become MatMulNBits; the characters read stay the same."""
    from edgec.models.catalogue import image, model_path

    source = ir.load(model_path("ocr-rec"))
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # opset 12 goes through onnx's converter
    crop = image("text")[:48, :320].astype(np.float32) / 255
    x = np.repeat(((crop - 0.5) / 0.5)[None, None], 3, axis=1)
    reference = run(source, {"x": x}, optimize=True)

    model = copy(source)
    stats = quantize_int4(model, method="hqq", symmetric=False)
    assert stats["layers"] == 9 and set(stats["errors"]) == set(ocr_rec_weights)
    assert lower_int4_matmuls(model) == 9
    assert "DequantizeLinear" not in ops(model) and ops(model)["MatMulNBits"] == 9
    y = run(model, {"x": x}, optimize=True)
    assert (y.argmax(-1) == reference.argmax(-1)).mean() == 1.0
    assert np.abs(y - reference).max() < 0.25  # probabilities
