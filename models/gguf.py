"""Read a GGUF file (llama.cpp's model format) into hyper-parameters, metadata and weights.

A thin layer over the ``gguf`` package's ``GGUFReader`` (a memory map; nothing is read until a
tensor is dequantized) that turns its failures into ``InputError``s a user can act on, and names
things the way the builders need them:

    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.architecture            'llama'
    model.hparams                 HyperParameters(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ...)
    model.metadata["tokenizer.ggml.model"]           'gpt2'
    model.tensor("blk.0.attn_q.weight").ggml_type    'Q4_1'
    model.dequantize("blk.0.attn_q.weight")          float32 [576, 576]  ([out, in], as torch stores it)
    model.blocks("blk.0.attn_q.weight")              QuantBlocks: codes and scales as stored (Q4_0/Q4_1/Q8_0)

Shapes are numpy order: GGUF lists dimensions innermost first (``ne0`` = the input features of a
linear layer), so a GGUF ``[576, 1536]`` weight is numpy ``[1536, 576]``, i.e. ``[out, in]``. ggml
quantizes along that innermost dimension in blocks of 32, so blocks run along ``in`` (the K of a
MatMul), which is what ``DequantizeLinear(axis=0, block_size=32)`` on the transposed ``[in, out]``
weight and MatMulNBits both expect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import InputError

#: Values per block in the block formats kept as blocks (``GGUFModel.blocks``).
QK = 32
#: Bytes per 32-value block: fp16 d + 16 bytes of nibbles (Q4_0); fp16 d + fp16 m + nibbles (Q4_1);
#: fp16 d + 32 int8 (Q8_0).
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_MAGIC = b"GGUF"


@dataclass(frozen=True)
class HyperParameters:
    """The numbers a decoder builder needs, read from ``{architecture}.*`` metadata keys."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_dim: int  #: dimensions of each head that RoPE rotates (llama: all of them)
    rope_scaling: dict[str, Any] = field(default_factory=dict)  #: {"type": "linear", "factor": 4.0, ...}; {} = none


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: ``shape`` in numpy order, ``ggml_type`` e.g. 'Q4_1', ``data`` the raw memmap."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray  #: the reader's view: float arrays for F32/F16, uint8 rows of blocks for quantized types

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass(frozen=True)
class QuantBlocks:
    """A Q4_0, Q4_1 or Q8_0 tensor [rows, cols] as ggml stores it, unpacked but not dequantized.

    Value ``(r, c)``, with ``b = c // 32``, is

        Q4_0   d[r, b] * (codes[r, c] - 8)        codes uint8 0..15
        Q4_1   d[r, b] * codes[r, c] + m[r, b]    codes uint8 0..15
        Q8_0   d[r, b] * codes[r, c]              codes int8 -128..127
    """

    ggml_type: str
    codes: np.ndarray  #: [rows, cols]
    d: np.ndarray  #: float16 [rows, cols // 32]
    m: np.ndarray | None = None  #: float16 [rows, cols // 32], Q4_1 only

    def take_rows(self, index: np.ndarray) -> QuantBlocks:
        """The same blocks with rows reordered (rows are whole blocks, so this is exact)."""
        return QuantBlocks(self.ggml_type, self.codes[index], self.d[index], None if self.m is None else self.m[index])

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], computed as ``gguf.quants`` does (so equal to ``GGUFModel.dequantize``)."""
        d = np.repeat(self.d.astype(np.float32), QK, axis=1)
        if self.ggml_type == "Q4_0":
            return d * (self.codes.astype(np.int8) - np.int8(8)).astype(np.float32)
        if self.ggml_type == "Q8_0":
            return d * self.codes.astype(np.float32)
        return d * self.codes.astype(np.float32) + np.repeat(self.m.astype(np.float32), QK, axis=1)


class GGUFModel:
    """An opened GGUF: metadata (plain Python values), tensors by name, hyper-parameters."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, GGUFTensor]) -> None:
        self.path = path
        self.metadata = metadata
        self.tensors = tensors

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r}, architecture={self.architecture!r}, tensors={len(self.tensors)})"

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    def tensor(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise InputError(
                f"{self.path}: tensor {name!r} is missing; a {self.architecture or 'GGUF'} model needs it "
                f"(the file has {len(self.tensors)} tensors, e.g. {', '.join(list(self.tensors)[:3])}); "
                "it may come from an incompatible converter"
            )
        return self.tensors[name]

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in numpy order. Every type ``gguf.quants`` knows is supported."""
        import gguf
        from gguf.quants import dequantize

        t = self.tensor(name)
        try:
            values = dequantize(np.asarray(t.data), gguf.GGMLQuantizationType[t.ggml_type])
        except NotImplementedError:
            raise InputError(
                f"{self.path}: tensor {name!r} is stored as {t.ggml_type}, which cannot be dequantized "
                f"(supported: {', '.join(dequantizable_types())}); re-convert the model with another quantization"
            ) from None
        return np.ascontiguousarray(values.reshape(t.shape), dtype=np.float32)

    def blocks(self, name: str) -> QuantBlocks:
        """The blocks of a Q4_0/Q4_1/Q8_0 tensor, unpacked to one code per value (nothing is rounded)."""
        t = self.tensor(name)
        if t.ggml_type not in _BLOCK_BYTES:
            raise InputError(f"{self.path}: tensor {name!r} is {t.ggml_type}, not one of {', '.join(_BLOCK_BYTES)}")
        rows, cols = t.shape[0], int(np.prod(t.shape[1:]))
        raw = np.asarray(t.data).reshape(rows, cols // QK, _BLOCK_BYTES[t.ggml_type])
        d = raw[..., 0:2].copy().view(np.float16)[..., 0]
        if t.ggml_type == "Q8_0":
            return QuantBlocks("Q8_0", raw[..., 2:].copy().view(np.int8).reshape(rows, cols), d)
        m = raw[..., 2:4].copy().view(np.float16)[..., 0] if t.ggml_type == "Q4_1" else None
        nibbles = raw[..., -16:]
        # ggml packs value j of a block in the low nibble of byte j and value j + 16 in its high nibble.
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)
        return QuantBlocks(t.ggml_type, codes, d, m)

    @property
    def hparams(self) -> HyperParameters:
        arch = self.architecture
        get = self._int

        n_heads = get(f"{arch}.attention.head_count")
        hidden = get(f"{arch}.embedding_length")
        head_dim = get(f"{arch}.attention.key_length", hidden // n_heads if n_heads else 0)
        vocab = self.metadata.get(f"{arch}.vocab_size")
        if vocab is None:  # older converters leave it out; the token list and embedding agree
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens else self.tensor("token_embd.weight").shape[0]
        scaling: dict[str, Any] = {}
        kind = self.metadata.get(f"{arch}.rope.scaling.type")
        factor = self.metadata.get(f"{arch}.rope.scaling.factor")
        if factor is None and self.metadata.get(f"{arch}.rope.scale_linear") is not None:  # pre-2024 key
            kind, factor = "linear", self.metadata[f"{arch}.rope.scale_linear"]
        if kind not in (None, "none"):
            scaling = {"type": str(kind), "factor": float(factor or 1.0)}
            for key in ("original_context_length", "yarn_log_multiplier", "attn_factor"):
                if f"{arch}.rope.scaling.{key}" in self.metadata:
                    scaling[key] = self.metadata[f"{arch}.rope.scaling.{key}"]
        return HyperParameters(
            n_layers=get(f"{arch}.block_count"),
            n_heads=n_heads,
            n_kv_heads=get(f"{arch}.attention.head_count_kv", n_heads),
            head_dim=head_dim,
            hidden=hidden,
            ffn=get(f"{arch}.feed_forward_length"),
            vocab=int(vocab),
            context_length=get(f"{arch}.context_length"),
            rms_eps=float(self.metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=get(f"{arch}.rope.dimension_count", head_dim),
            rope_scaling=scaling,
        )

    def _int(self, key: str, default: int | None = None) -> int:
        value = self.metadata.get(key, default)
        if value is None:
            raise InputError(f"{self.path}: metadata key {key!r} is missing; the file is incomplete or not a "
                             f"{self.architecture or 'known'} model")
        if isinstance(value, list):  # per-layer lists (e.g. head_count_kv) exist; llama uses one value
            if len(set(value)) != 1:
                raise InputError(f"{self.path}: {key} differs between layers ({value}); this builder needs one value")
            value = value[0]
        return int(value)


def dequantizable_types() -> list[str]:
    """ggml types ``GGUFModel.dequantize`` handles (everything ``gguf.quants`` implements)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the package's own registry; no public list exists

    return ["F32", "F16"] + [t.name for t in GGMLQuantizationType if t in _type_traits]


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open ``path`` and read its metadata and tensor table (weights stay memory-mapped).

    Raises ``InputError`` for a missing file, a file that is not GGUF, and a corrupted or truncated one.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != _MAGIC:
        raise InputError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in (2, 3):
        raise InputError(f"{path}: GGUF version {version} is not supported (only 2 and 3); the file may be corrupted")

    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data)
    except Exception as exc:  # the reader fails with ValueError/IndexError/... wherever the bytes run out
        raise InputError(
            f"{path}: corrupted or truncated GGUF ({path.stat().st_size:,} bytes; the reader said: "
            f"{type(exc).__name__}: {exc}); download or copy the file again"
        ) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > path.stat().st_size:  # the reader maps lazily; make sure every tensor's bytes exist
        raise InputError(f"{path}: truncated GGUF: tensors need {end:,} bytes, the file has {path.stat().st_size:,}")
    return GGUFModel(path, metadata, tensors)


def _field_value(field_) -> Any:
    """A ReaderField as a plain Python value (str, int, float, bool, or a list of them)."""
    from gguf import GGUFValueType

    if field_.types and field_.types[0] == GGUFValueType.ARRAY:
        kind = field_.types[-1]
        parts = [field_.parts[i] for i in field_.data]
        if kind == GGUFValueType.STRING:
            return [bytes(p).decode("utf-8", errors="replace") for p in parts]
        return [p.tolist()[0] for p in parts]
    value = field_.parts[field_.data[0]]
    if field_.types and field_.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0]
