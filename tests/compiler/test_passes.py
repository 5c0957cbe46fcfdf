"""Each pass in ``edgec.compiler.passes`` on a tiny graph: the structural change it promises, and
the same numbers out of onnxruntime before and after. Plus the pipeline plumbing and one real model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.compiler import frontend
from edgec.compiler.passes import DEFAULT_PASSES, PASSES, build
from edgec.compiler.pipeline import PassCheckError, PassStats, count_nodes, run_pipeline
from edgec.errors import InputError

F = TensorProto.FLOAT
rng = np.random.default_rng(0)


# --- helpers -----------------------------------------------------------------------------------


def make_model(nodes, inputs, outputs, weights=None, opset=18, extra_opsets=()) -> ir.Model:
    """A model from onnx.helper nodes, shapes inferred. ``inputs``/``outputs``: {name: shape}
    (float32) or {name: (elem_type, shape)}; ``weights``: {name: array} become initializers."""

    def info(name, spec):
        elem, shape = spec if isinstance(spec, tuple) else (F, spec)
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(
        nodes,
        "g",
        [info(n, s) for n, s in inputs.items()],
        [info(n, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (weights or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    proto = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(proto, full_check=True)
    # Types of intermediate values, as the frontend provides them (some rules read dtypes).
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def f32(*shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def const(value, name: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def ops(model: ir.Model) -> Counter:
    """op_type counts over the graph and its subgraphs."""
    return Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def nodes_of(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == op_type]


def run(model: ir.Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the graph as written
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: ir.Model) -> dict:
    return {v.name: f32(*v.shape) for v in model.graph.inputs}


def apply(passes: str | list[str], model: ir.Model, feeds: list[dict] | None = None, **kw) -> list[PassStats]:
    """Run the named pass(es) with the pipeline; the result must check and match onnxruntime on the original."""
    before = ir.serde.serialize_model(model)
    feeds = feeds or [random_feeds(model)]
    expected = [run(before, f) for f in feeds]
    names = [passes] if isinstance(passes, str) else passes
    stats = run_pipeline(model, build(names), **kw)
    after = ir.serde.serialize_model(model)
    onnx.checker.check_model(after, full_check=True)
    for f, want in zip(feeds, expected):
        got = run(after, f)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    return stats


# --- fold-batchnorm ----------------------------------------------------------------------------


def _bn(c: int, x: str, y: str) -> tuple[onnx.NodeProto, dict]:
    weights = {
        "bn_scale": f32(c),
        "bn_bias": f32(c),
        "bn_mean": f32(c),
        "bn_var": (rng.random(c) + 0.5).astype(np.float32),
    }
    return helper.make_node("BatchNormalization", [x, *weights], [y], epsilon=1e-5), weights


@pytest.mark.parametrize(
    "op, x_shape, w_shape, y_shape, attrs",
    [
        ("Conv", [1, 3, 8, 8], [4, 3, 3, 3], [1, 4, 8, 8], {"pads": [1, 1, 1, 1]}),
        ("ConvTranspose", [1, 3, 8, 8], [3, 4, 3, 3], [1, 4, 17, 17], {"strides": [2, 2]}),
        ("Gemm", [2, 5], [5, 4], [2, 4], {}),
    ],
    ids=["Conv", "ConvTranspose", "Gemm"],
)
def test_fold_batchnorm(op, x_shape, w_shape, y_shape, attrs):
    c = y_shape[1]
    bn, bn_weights = _bn(c, "h", "y")
    w, b = f32(*w_shape), f32(c)
    model = make_model(
        [helper.make_node(op, ["x", "w", "b"], ["h"], **attrs), bn],
        {"x": x_shape},
        {"y": y_shape},
        {"w": w, "b": b, **bn_weights},
    )
    apply("fold-batchnorm", model)
    assert "BatchNormalization" not in ops(model)
    (node,) = nodes_of(model, op)
    assert not np.allclose(node.inputs[1].const_value.numpy(), w)


# --- fuse-activations --------------------------------------------------------------------------

_SCALARS = {"three": np.float32(3), "zero": np.float32(0), "six": np.float32(6)}


def _hardswish(mul_inputs: list[str]) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", mul_inputs, ["m"]),
        helper.make_node("Div", ["m", "six"], ["y"]),
    ]


FUSIONS = {
    "hardswish x*clip": (_hardswish(["x", "c"]), {"HardSwish": 1}),
    "hardswish clip*x": (_hardswish(["c", "x"]), {"HardSwish": 1}),
    "hardsigmoid": (
        [
            helper.make_node("Add", ["x", "three"], ["a"]),
            helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
            helper.make_node("Div", ["c", "six"], ["y"]),
        ],
        {"HardSigmoid": 1},
    ),
    "relu relu": (
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
        {"Relu": 1},
    ),
    "clip clip": (
        [
            helper.make_node("Clip", ["x", "", "six"], ["c"]),
            helper.make_node("Clip", ["c", "zero", ""], ["y"]),
        ],
        {"Clip": 1},
    ),
    "max min": (
        [helper.make_node("Max", ["x", "zero"], ["m"]), helper.make_node("Min", ["m", "six"], ["y"])],
        {"Clip": 1},
    ),
    "pad conv": (
        [
            helper.make_node("Pad", ["x4", "pads"], ["p"]),
            helper.make_node("Conv", ["p", "w"], ["y"]),
        ],
        {"Conv": 1},
    ),
}


@pytest.mark.parametrize("case", FUSIONS)
def test_fuse_activations(case):
    nodes, expected = FUSIONS[case]
    inputs = {"x4": [1, 2, 6, 6]} if case == "pad conv" else {"x": [2, 3, 4]}
    weights = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": f32(3, 2, 3, 3)} if case == "pad conv" else _SCALARS
    model = make_model(nodes, inputs, {"y": [1, 3, 6, 6] if case == "pad conv" else [2, 3, 4]}, weights)
    apply("fuse-activations", model)
    assert ops(model) == expected


# --- fold-constants ----------------------------------------------------------------------------


def test_fold_constants_constant_of_shape_chain_becomes_a_weight():
    w = f32(2, 3)
    model = make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["filled"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
            helper.make_node("Add", ["filled", "w"], ["k"]),
            helper.make_node("Mul", ["x", "k"], ["y"]),
        ],
        {"x": [2, 3]},
        {"y": [2, 3]},
        {"shape": np.array([2, 3], np.int64), "w": w},
    )
    apply("fold-constants", model)
    assert ops(model) == {"Mul": 1}
    k = nodes_of(model, "Mul")[0].inputs[1]
    assert k.is_initializer()
    np.testing.assert_allclose(k.const_value.numpy(), w + 1.5)


def test_fold_constants_constant_node_becomes_initializer():
    c = f32(4)
    model = make_model([const(c, "c"), helper.make_node("Add", ["x", "c"], ["y"])], {"x": [2, 4]}, {"y": [2, 4]})
    stats = apply("fold-constants", model)
    assert ops(model) == {"Add": 1}
    assert stats[0].changes["weights_added"] == 1
    (value,) = model.graph.initializers.values()
    np.testing.assert_array_equal(value.const_value.numpy(), c)
    assert nodes_of(model, "Add")[0].inputs[1] is value


def test_fold_constants_shape_gather_reshape_on_static_input():
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        {"x": [2, 3, 4]},
        {"y": [2, 12]},
        {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus_one": np.array([-1], np.int64)},
    )
    apply("fold-constants", model)
    assert ops(model) == {"Reshape": 1}
    shape = nodes_of(model, "Reshape")[0].inputs[1]
    np.testing.assert_array_equal(shape.const_value.numpy(), [2, -1])


def test_fold_constants_weight_transpose():
    w = f32(4, 3)
    model = make_model(
        [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        {"x": [2, 3]},
        {"y": [2, 4]},
        {"w": w},
    )
    apply("fold-constants", model)
    assert ops(model) == {"MatMul": 1}
    np.testing.assert_array_equal(nodes_of(model, "MatMul")[0].inputs[1].const_value.numpy(), w.T)


# --- remove-identity ---------------------------------------------------------------------------


def test_remove_identity_drops_identity_and_dropout_but_keeps_output_identity():
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Dropout", ["b", "ratio"], ["c"]),
            helper.make_node("Dropout", ["c"], ["d", "mask"]),
            helper.make_node("Identity", ["d"], ["y"]),  # a graph output: stays
        ],
        {"x": [2, 3]},
        {"y": [2, 3]},
        {"ratio": np.float32(0.5)},
    )
    stats = apply("remove-identity", model)
    assert ops(model) == {"Relu": 1, "Identity": 1}
    assert model.graph.outputs[0].name == "y"
    assert model.graph.outputs[0].producer().op_type == "Identity"
    assert nodes_of(model, "Relu")[0].inputs[0] is model.graph.inputs[0]
    assert stats[0].changes["removed"] >= 1


def test_remove_identity_keeps_dropout_whose_mask_is_read():
    model = make_model(
        [helper.make_node("Dropout", ["x"], ["y", "mask"])],
        {"x": [2, 3]},
        {"y": [2, 3], "mask": (TensorProto.BOOL, [2, 3])},
    )
    apply("remove-identity", model)
    assert ops(model) == {"Dropout": 1}


def test_remove_identity_keeps_input_to_output_identity():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], {"x": [3]}, {"y": [3]})
    apply("remove-identity", model)
    assert ops(model) == {"Identity": 1}
    assert [v.name for v in model.graph.outputs] == ["y"]


# --- dead-code ---------------------------------------------------------------------------------


def test_dead_code_drops_unused_branch_weights_and_opsets():
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("MatMul", ["x", "w_dead"], ["m"]),
            helper.make_node("Add", ["m", "b_dead"], ["unused"]),
        ],
        {"x": [2, 3]},
        {"y": [2, 3]},
        {"w_dead": f32(3, 4), "b_dead": f32(4), "never_read": f32(10)},
        extra_opsets=[("com.microsoft", 1)],
    )
    stats = apply("dead-code", model)
    assert ops(model) == {"Relu": 1}
    assert len(model.graph.initializers) == 0
    assert "com.microsoft" not in model.opset_imports
    assert stats[0].bytes_after == 0 < stats[0].bytes_before
    assert stats[0].changes["weights_removed"] == 3


# --- dedupe ------------------------------------------------------------------------------------

_W = f32(2, 3)

DEDUPES = {
    "identical weights": (
        [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Mul", ["a", "w2"], ["y"])],
        {"Add": 1, "Mul": 1},
        1,
    ),
    "identical subexpressions": (
        [
            helper.make_node("Relu", ["x"], ["r1"]),
            helper.make_node("Relu", ["x"], ["r2"]),
            helper.make_node("Add", ["r1", "r2"], ["y"]),
        ],
        {"Relu": 1, "Add": 1},
        0,
    ),
    "identical after merging weights": (
        [
            helper.make_node("Add", ["x", "w1"], ["a"]),
            helper.make_node("Add", ["x", "w2"], ["b"]),
            helper.make_node("Mul", ["a", "b"], ["y"]),
        ],
        {"Add": 1, "Mul": 1},
        1,
    ),
}


@pytest.mark.parametrize("case", DEDUPES)
def test_dedupe(case):
    nodes, expected, merged = DEDUPES[case]
    used = {i for n in nodes for i in n.input}
    weights = {n: _W.copy() for n in ("w1", "w2") if n in used}
    model = make_model(nodes, {"x": [2, 3]}, {"y": [2, 3]}, weights)
    stats = apply("dedupe", model)
    assert ops(model) == expected
    assert stats[0].changes["weights_merged"] == merged
    assert len(model.graph.initializers) == len(weights) - merged


# --- shape-cleanup -----------------------------------------------------------------------------

SHAPE_CASES = {
    "reshape reshape": (
        [
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
        ],
        [4, 6],
        {"Reshape": 1},
    ),
    "inverse transposes": (
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 2, 0]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[2, 0, 1]),
            helper.make_node("Relu", ["t2"], ["y"]),
        ],
        [2, 3, 4],
        {"Relu": 1},
    ),
    "transposes compose": (
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]),
            helper.make_node("Transpose", ["t1"], ["y"], perm=[0, 2, 1]),
        ],
        [3, 4, 2],
        {"Transpose": 1},
    ),
    "cast to own type": (
        [helper.make_node("Cast", ["x"], ["c"], to=F), helper.make_node("Relu", ["c"], ["y"])],
        [2, 3, 4],
        {"Relu": 1},
    ),
}


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_shape_cleanup(case):
    nodes, y_shape, expected = SHAPE_CASES[case]
    weights = {"s1": np.array([6, 4], np.int64), "s2": np.array([4, 6], np.int64)} if case == "reshape reshape" else {}
    model = make_model(nodes, {"x": [2, 3, 4]}, {"y": y_shape}, weights)
    apply("shape-cleanup", model)
    assert ops(model) == expected
    first = next(iter(model.graph))
    assert first.inputs[0] is model.graph.inputs[0]
    if case == "reshape reshape":
        np.testing.assert_array_equal(first.inputs[1].const_value.numpy(), [4, 6])


# --- the pipeline ------------------------------------------------------------------------------


def _conv_bn_hardswish() -> ir.Model:
    """Conv -> BatchNorm -> x*Clip(x+3,0,6)/6 -> Identity -> Relu: something for every pass to do."""
    bn, bn_weights = _bn(4, "h", "x")
    return make_model(
        [
            helper.make_node("Conv", ["input", "w", "b"], ["h"], pads=[1, 1, 1, 1]),
            bn,
            *_hardswish(["x", "c"]),
            helper.make_node("Identity", ["y"], ["i"]),
            helper.make_node("Relu", ["i"], ["out"]),
        ],
        {"input": [1, 3, 8, 8]},
        {"out": [1, 4, 8, 8]},
        {"w": f32(4, 3, 3, 3), "b": f32(4), **bn_weights, **_SCALARS},
    )


def test_run_pipeline_reports_every_pass():
    model = _conv_bn_hardswish()
    start = count_nodes(model.graph)
    seen = []
    stats = apply(DEFAULT_PASSES, model, progress=seen.append)

    assert [s.name for s in stats] == seen == DEFAULT_PASSES
    assert all(isinstance(s, PassStats) and s.ms >= 0 for s in stats)
    assert stats[0].nodes_before == start and stats[-1].nodes_after == count_nodes(model.graph)
    for prev, nxt in zip(stats, stats[1:]):
        assert (prev.nodes_after, prev.bytes_after) == (nxt.nodes_before, nxt.bytes_before)
    by_name = {s.name: s for s in stats}
    bn = by_name["fold-batchnorm"]
    assert bn.nodes_after == bn.nodes_before - 1 and bn.bytes_after < bn.bytes_before
    assert by_name["fuse-activations"].changes["rewrites"] >= 1
    assert set(stats[0].to_json()) == {"name", "nodes_before", "nodes_after", "bytes_before", "bytes_after", "ms", "changes"}
    assert ops(model) == {"Conv": 1, "HardSwish": 1, "Relu": 1}


def test_run_pipeline_check_each_pass():
    model = _conv_bn_hardswish()
    stats = apply(DEFAULT_PASSES, model, check_each_pass=True)
    assert len(stats) == len(DEFAULT_PASSES)


def test_check_each_pass_names_the_pass_that_broke_the_model():
    class Breaks:
        name = "breaks-things"
        summary = "turns every node into an op that does not exist"

        def __call__(self, model):
            for node in model.graph:
                node.op_type = "NoSuchOp"
            return {}

    model = _conv_bn_hardswish()
    with pytest.raises(PassCheckError, match="breaks-things"):
        run_pipeline(model, [*build(["remove-identity"]), Breaks()], check_each_pass=True)
    run_pipeline(_conv_bn_hardswish(), [Breaks()])  # unchecked: no error


def test_build():
    assert [p.name for p in build(DEFAULT_PASSES)] == DEFAULT_PASSES == list(PASSES)
    kept = build(DEFAULT_PASSES, disabled=["dedupe", "fold-constants"])
    assert [p.name for p in kept] == [n for n in DEFAULT_PASSES if n not in ("dedupe", "fold-constants")]
    assert all(p.summary for p in kept)
    with pytest.raises(InputError, match="no-such-pass"):
        build(["remove-identity", "no-such-pass"])
    with pytest.raises(InputError, match="no-such-pass"):
        build(DEFAULT_PASSES, disabled=["no-such-pass"])


# --- subgraphs: an If whose branches hold Identity and constants, like Silero VAD --------------


def _if_model(tmp_path) -> ir.Model:
    then_branch = helper.make_graph(
        [
            const(np.arange(4, dtype=np.float32).reshape(1, 4), "k"),
            helper.make_node("Add", ["x", "k"], ["t"]),
            helper.make_node("Identity", ["t"], ["then_out"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", F, [1, 4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_out"])],  # a branch output that is an outer-scope value
        "else",
        [],
        [helper.make_tensor_value_info("else_out", F, [1, 4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x_in"], ["x"]),
            helper.make_node("If", ["cond"], ["branch"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Relu", ["branch"], ["y"]),
        ],
        "if_model",
        [helper.make_tensor_value_info("x_in", F, [1, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [1, 4])],
    )
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return frontend.load(path).model


def test_pipeline_keeps_if_subgraphs_valid_and_equivalent(tmp_path):
    model = _if_model(tmp_path)
    x = f32(1, 4)
    feeds = [{"x_in": x, "cond": np.array(c)} for c in (True, False)]
    apply(DEFAULT_PASSES, model, feeds, check_each_pass=True)
    # The Constant became a branch weight; the main-graph Identity went; the else branch still
    # needs its Identity, since a branch output cannot be an outer-scope value.
    assert ops(model) == {"If": 1, "Add": 1, "Identity": 1, "Relu": 1}
    (if_node,) = nodes_of(model, "If")
    assert len(if_node.attributes["then_branch"].as_graph().initializers) == 1


# --- a real model ------------------------------------------------------------------------------


def test_ocr_classifier_default_pipeline():
    from edgec.models.catalogue import model_path

    path = model_path("ocr-cls")
    model = frontend.load(path).model
    before = ops(model)
    assert before["BatchNormalization"] > 0

    run_pipeline(model, build(DEFAULT_PASSES))

    after = ops(model)
    assert sum(after.values()) < sum(before.values())
    assert "BatchNormalization" not in after
    assert after["HardSwish"] > 0
    x = np.random.default_rng(1).random((1, 3, 48, 192), dtype=np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = run(model, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


# --- fold-scale-shift ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scale, shift, bias, pads, folds",
    [
        (f32(1), f32(1), True, [1, 1, 1, 1], True),  # PP-LCNet's scalar affine after a Conv
        (f32(1, 4, 1, 1), f32(4, 1, 1), False, [0, 0, 0, 0], True),  # per-channel, Conv without bias
        (f32(1), None, True, [0, 0, 0, 0], True),  # scale only
        (None, f32(1, 4, 1, 1), True, [0, 0, 0, 0], True),  # shift only
        (f32(1, 1, 6, 1), None, True, [0, 0, 0, 0], False),  # varies along H: not per-channel
    ],
    ids=["scalar", "per-channel-no-bias", "scale-only", "shift-only", "spatial-scale"],
)
def test_fold_scale_shift_after_conv(scale, shift, bias, pads, folds):
    weights = {"w": f32(4, 3, 3, 3)}
    if bias:
        weights["b"] = f32(4)
    nodes, last = [helper.make_node("Conv", ["x", *(["w", "b"] if bias else ["w"])], ["c"], pads=pads)], "c"
    if scale is not None:
        weights["a"] = scale
        nodes.append(helper.make_node("Mul", ["a", last], ["m"]))  # constant first, as PP-OCR has it
        last = "m"
    if shift is not None:
        weights["s"] = shift
        nodes.append(helper.make_node("Add", [last, "s"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    out_hw = 8 if pads[0] else 6
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, out_hw, out_hw]}, weights)
    apply("fold-scale-shift", model)
    assert (ops(model) == {"Conv": 1}) is folds


@pytest.mark.parametrize("pads, folds", [([0, 0, 0, 0], True), ([1, 1, 1, 1], False)], ids=["unpadded", "padded"])
def test_fold_scale_shift_before_conv(pads, folds):
    """Mul -> Add -> Conv folds only when no zero padding would escape the affine."""
    weights = {"a": f32(1, 3, 1, 1), "s": f32(1, 3, 1, 1), "w": f32(4, 3, 1, 1), "b": f32(4)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "a"], ["m"]),
        helper.make_node("Add", ["m", "s"], ["h"]),
        helper.make_node("Conv", ["h", "w", "b"], ["y"], pads=pads),
    ]
    side = 8 if pads[0] == 0 else 10
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, side, side]}, weights)
    apply("fold-scale-shift", model)
    assert (ops(model) == {"Relu": 1, "Conv": 1}) is folds


def test_fold_scale_shift_keeps_conv_output_read_elsewhere():
    weights = {"w": f32(4, 3, 3, 3), "b": f32(4), "a": f32(1)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Mul", ["c", "a"], ["y"]),
        helper.make_node("Relu", ["c"], ["z"]),
    ]
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 6, 6], "z": [1, 4, 6, 6]}, weights)
    apply("fold-scale-shift", model)
    assert ops(model)["Mul"] == 1
