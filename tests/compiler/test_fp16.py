"""fp16: float16 weights and compute with float32 kept where float16 overflows or loses accuracy
(``edgec.compiler.quantize.fp16``), on a small graph and on the real PP-OCRv4 recognizer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edgec.compiler.quantize import calibrate
from edgec.compiler.quantize.fp16 import convert_fp16, fp16_kernel_coverage, reads_or_writes_fp16, to_half
from edgec.errors import InputError
from edgec.runtime import ort as ort_backend

FLOAT16 = ir.DataType.FLOAT16


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return ort_backend.run(ort_backend.create_session_from_proto(ir.serde.serialize_model(model)), feeds)


def run_fp16(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output computed in real float16 arithmetic. onnxruntime's x86-64 CPU provider has no
    float16 Conv, MatMul or elementwise kernels: it casts weights to float32 at load, drops Cast pairs
    it deems precision-free and computes in float32, so it cannot show what float16 does; onnx's
    reference evaluator computes each op in numpy in its inputs' type."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in float16 is what some tests show
        return ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, feeds)[0]


def check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def precision(report: dict) -> dict[str, str]:
    """node name -> "fp32: reason" or "fp16", for every float node of the converted model's source."""
    return {row["node"]: "fp16" if row["precision"] == "float16" else f"fp32: {row['reason']}" for row in report["layers"]}


# --- a small graph with one MatMul whose output float16 cannot hold ------------------------------


def big_matmul_model() -> ir.Model:
    """x[8,16] -> mm1 -> mm_big (outputs ~2e5) -> scale (x 1e-3) -> relu -> mm3 -> y[8,4]."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) / 4
    w2 = (rng.standard_normal((32, 32)) * 10000).astype(np.float32)
    w3 = rng.standard_normal((32, 4)).astype(np.float32) / 8
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
            helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="mm_big"),
            helper.make_node("Mul", ["h2", "k"], ["h3"], name="scale"),
            helper.make_node("Relu", ["h3"], ["h4"], name="relu"),
            helper.make_node("MatMul", ["h4", "w3"], ["y"], name="mm3"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3"),
         numpy_helper.from_array(np.array(1e-3, np.float32), "k")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def samples(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(n)]


def test_matmul_beyond_limit_stays_fp32_and_output_matches():
    model = big_matmul_model()
    before = ir.serde.serialize_model(model).SerializeToString()
    ranges = calibrate.collect_ranges(model, samples(4))
    assert float(np.max(np.abs(ranges.data["h2"].range_value))) > 65504  # float16 would turn it into inf
    half, report = convert_fp16(model, ranges=ranges)
    assert ir.serde.serialize_model(model).SerializeToString() == before  # the input model is untouched
    check(half)

    where = precision(report)
    assert where["mm1"] == where["mm3"] == "fp16"
    assert where["mm_big"].startswith("fp32: output 'h2' reaches") and "> limit 4096" in where["mm_big"]
    assert where["scale"].startswith("fp32: input 'h2' reaches")  # a float16 Mul would read inf
    assert where["relu"].startswith("fp32: follows its float32 inputs")
    assert report["nodes_fp16"] == 2 and report["nodes_fp32"] == 3
    weights = {name: v.dtype for name, v in half.graph.initializers.items()}
    assert weights["w1"] == weights["w3"] == FLOAT16 and weights["w2"] == ir.DataType.FLOAT

    for feeds in samples(3, seed=1):  # held-out inputs
        ref = run(model, feeds)["y"]
        for out in (run_fp16(half, feeds), run(half, feeds)["y"]):  # float16 arithmetic, and onnxruntime here
            assert out.dtype == np.float32 and np.isfinite(out).all()
            np.testing.assert_allclose(out, ref, rtol=1e-2, atol=2e-3 * np.abs(ref).max())

    # without ranges nothing tells the converter: the big MatMul overflows float16 and the output is lost
    blind, report = convert_fp16(model)
    assert report["nodes_fp32"] == 0 and not report["calibrated"]
    assert not np.isfinite(run_fp16(blind, samples(1, seed=1)[0])).all()


def test_tiny_activations_stay_fp32():
    model = big_matmul_model()
    ranges = {name: (-1.0, 1.0) for name in ("x", "h1", "h2", "h3", "h4", "y")} | {"h1": (-5e-5, 3e-5)}
    _, report = convert_fp16(model, ranges=ranges)
    kept = {k: why for k, why in precision(report).items() if why != "fp16"}
    assert "'h1' stays below 5e-05" in kept["mm1"] and "subnormal" in kept["mm1"]
    assert "input 'h1'" in kept["mm_big"]


def test_keep_float_is_honoured_and_checked():
    model = big_matmul_model()
    half, report = convert_fp16(model, keep_float=["mm3"])
    kept = {k: why for k, why in precision(report).items() if why != "fp16"}
    assert kept == {"mm3": "fp32: kept float by keep_float"}
    assert half.graph.initializers["w3"].dtype == ir.DataType.FLOAT
    mm3 = next(n for n in half.graph if n.name == "mm3")
    assert [v.dtype for v in mm3.inputs] == [ir.DataType.FLOAT, ir.DataType.FLOAT]
    check(half)
    with pytest.raises(InputError, match="keep_float 'nope': not a node that computes in float"):
        convert_fp16(model, keep_float=["nope"])


def test_graph_inputs_and_outputs_stay_float32():
    model = big_matmul_model()
    half, _ = convert_fp16(model)
    assert [(v.name, v.dtype) for v in half.graph.inputs] == [("x", ir.DataType.FLOAT)]
    assert [(v.name, v.dtype) for v in half.graph.outputs] == [("y", ir.DataType.FLOAT)]
    session = ort_backend.create_session_from_proto(ir.serde.serialize_model(half))
    assert [(a.name, a.type) for a in (*session.get_inputs(), *session.get_outputs())] == [("x", "tensor(float)"), ("y", "tensor(float)")]
    casts = [n for n in half.graph if n.op_type == "Cast"]
    assert [c.inputs[0].name for c in casts][0] == "x" and casts[-1].outputs[0].name == "y"


def test_weights_keep_sign_and_range():
    h = to_half(np.array([1e-9, -1e-9, 0.0, 1e6, -np.inf, 0.5], np.float32))
    assert h[0] > 0 and h[1] < 0 and h[2] == 0  # an epsilon stays nonzero
    assert h[3] == 65504 and h[4] == -np.inf and h[5] == 0.5


def test_if_bodies_convert_inside_and_capture_outer_values():
    """The branches read a float16 value of the outer graph; their outputs stay float32 like the If's."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    branch = lambda name, op: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["h", "w"], [f"{name}_mm"], name=f"{name}_mm"), helper.make_node(op, [f"{name}_mm"], [f"{name}_y"], name=f"{name}_act")],
        name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", "Relu"), else_branch=branch("else", "Sigmoid")),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    half, report = convert_fp16(model)
    check(half)
    assert {k for k, why in precision(report).items() if why != "fp16"} == {"if"}
    assert report["nodes_fp16"] == 5  # mm and both branches' MatMul and activation
    x = rng.standard_normal((2, 4)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run(half, feeds)["y"], run(model, feeds)["y"], rtol=1e-2, atol=1e-2)


def test_kernel_coverage_lists_every_fp16_op():
    half, _ = convert_fp16(big_matmul_model())
    coverage = fp16_kernel_coverage(half)
    assert set(coverage) == {n.op_type for n in half.graph if reads_or_writes_fp16(n)} == {"Cast", "MatMul", "Mul", "Relu"}
    assert coverage["Cast"] is True
    assert isinstance(coverage["MatMul"], bool)  # False on x86-64 builds: onnxruntime casts around it


# --- the real recognizer on real text -------------------------------------------------------------


@pytest.fixture(scope="module")
def recognizer():
    """PP-OCRv4 rec after the default passes, with page.png's 7 lines and 40 word crops (calibration: lines + even words)."""
    from edgec.compiler import frontend, pipeline
    from edgec.compiler.passes import DEFAULT_PASSES, build
    from edgec.models import catalogue, ocr

    fe = frontend.load(catalogue.model_path("ocr-rec"))
    pipeline.run_pipeline(fe.model, build(DEFAULT_PASSES))
    det = ort_backend.create_session(catalogue.model_path("ocr-det"), ort_backend.DEFAULT_SETTINGS, cache=False)
    lines = [crop for _, crop in ocr.line_crops(catalogue.image("page"), lambda x: det.run(None, {"x": x})[0])]
    words = [w for line in lines for w in ocr.word_crops(line)]
    crops = [ocr.rec_preprocess(c) for c in lines + words]
    calib = crops[:len(lines)] + crops[len(lines)::2]
    chars = ocr.charset(onnx.load(catalogue.model_path("ocr-rec")))
    return fe.model, crops, calib, chars


def test_real_recognizer_reads_the_same_in_fp16(recognizer):
    from edgec.models import ocr

    model, crops, calib, chars = recognizer
    ranges = calibrate.collect_ranges(model, ({"x": x} for x in calib))
    half, report = convert_fp16(model, ranges=ranges)
    check(half)

    assert 0.49 < report["weight_bytes_after"] / report["weight_bytes_before"] < 0.51
    # PP-OCRv4's activations stay below 400: only the op rules keep nodes in float32
    assert set(report["kept_fp32_by_op"]) == {"GlobalAveragePool", "ReduceMean", "Pow", "Softmax", "Add", "Sqrt", "Reshape"}
    assert all(row["reason"].startswith("follows") for row in report["layers"]
               if row["precision"] == "float" and row["op"] in ("Add", "Sqrt", "Reshape"))
    assert report["nodes_fp16"] > 6 * report["nodes_fp32"]
    assert all(n.op_type != "Conv" or n.inputs[1].dtype == FLOAT16 for n in half.graph)

    output = model.graph.outputs[0].name
    fp32 = ort_backend.create_session_from_proto(ir.serde.serialize_model(model))
    fp16 = ort_backend.create_session_from_proto(ir.serde.serialize_model(half))
    agree = steps = 0
    for x in crops:
        ref, out = fp32.run([output], {"x": x})[0], fp16.run([output], {"x": x})[0]
        assert out.dtype == np.float32
        assert ocr.ctc_decode(out, chars)[0] == ocr.ctc_decode(ref, chars)[0]
        agree, steps = agree + int((out.argmax(-1) == ref.argmax(-1)).sum()), steps + ref.shape[1]
    # a few steps sit between two characters (0.44 vs 0.54): float16's rounding of the weights alone,
    # or random 2^-11 noise on them, moves those by 0.1-0.3 without changing the text read
    assert agree / steps > 0.99

    shortest = min(crops, key=lambda x: x.shape[-1])  # ~3 s in numpy: one crop in real float16 arithmetic
    ref = fp32.run([output], {"x": shortest})[0]
    assert ocr.ctc_decode(run_fp16(half, {"x": shortest}), chars)[0] == ocr.ctc_decode(ref, chars)[0]
