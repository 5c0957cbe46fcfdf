"""Decoders (LLMs) as compile inputs: where they come from, and how a compiled one is verified.

A decoder arrives as a GGUF file (imported on the fly), or as a folder from ``edgec import`` /
an optimum-style export: ``model.onnx`` + ``tokenizer.json`` + ``generation.json``. Its inputs
follow the optimum / onnxruntime-genai layout (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.N.key|value``).

Verification runs real text (passages of CPython's ``pydoc_data.topics``) through the source and the
artifact with an empty cache and compares the logits: next-token (top-1) agreement and perplexity.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgec.errors import InputError

SIDECARS = ("tokenizer.json", "generation.json")


@dataclass
class Source:
    """What the driver compiles: the ONNX file, files the bundle carries along, and a temp dir to clean."""

    onnx: Path
    sidecars: list[Path] = field(default_factory=list)
    gguf_weights: str | None = None  #: "float" or "gguf-int4" when imported from a GGUF
    reference: Path | None = None  #: what verification compares against, when not ``onnx`` itself
    _tmp: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def resolve(path: Path, quantize_mode: str | None) -> Source:
    """A model path as given (``.onnx``, a folder, or ``.gguf``) -> the ONNX to compile and its sidecars."""
    if path.suffix == ".gguf":
        from edgec.models.llama import import_gguf

        # int4 keeps the GGUF's own 4-bit blocks (exact) instead of dequantizing and re-quantizing
        weights = "gguf-int4" if quantize_mode == "int4" else "float"
        tmp = tempfile.TemporaryDirectory(prefix="edgec-gguf-")
        try:
            folder = import_gguf(path, Path(tmp.name) / "import", weights=weights)
            # the 4-bit bundle is verified against the float32 reference of the same weights
            reference = import_gguf(path, Path(tmp.name) / "float") / "model.onnx" if weights != "float" else None
        except BaseException:
            tmp.cleanup()
            raise
        return Source(folder / "model.onnx", [folder / s for s in SIDECARS], weights, reference, tmp)
    if path.is_dir():
        onnx_file = path / "model.onnx"
        if not onnx_file.is_file():
            raise InputError(f"{path}: a model folder must hold model.onnx (as `edgec import` writes)")
        config = path / "generation.json"
        weights = json.loads(config.read_text()).get("weights") if config.is_file() else None
        return Source(onnx_file, [path / s for s in SIDECARS if (path / s).is_file()], weights)
    return Source(path)


def is_decoder(signature: list[dict]) -> bool:
    names = {s["name"] for s in signature}
    return "input_ids" in names and any(n.startswith("past_key_values.") for n in names)


def text_samples(signature: list[dict], tokenizer_file: Path, count: int, length: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """``count`` passages of real English text, ``length`` tokens each, with an empty KV cache."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    texts = (topics[k] for k in sorted(topics) if len(topics[k]) > 2000)
    for _, text in zip(range(count), texts):
        ids = np.array(tokenizer.encode(text).ids[:length], np.int64)[None]
        yield _feeds(signature, ids)


def _feeds(signature: list[dict], ids: np.ndarray) -> dict[str, np.ndarray]:
    seq = ids.shape[1]
    feeds = {}
    for spec in signature:
        name = spec["name"]
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((1, seq), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(seq, dtype=np.int64)[None]
        elif name.startswith("past_key_values."):
            shape = [1 if i == 0 else (0 if i == 2 else d) for i, d in enumerate(spec["shape"])]
            if not all(isinstance(d, int) for d in shape):
                raise InputError(f"input {name!r} has shape {spec['shape']}: the cache's heads and head size must be static")
            feeds[name] = np.zeros(shape, np.dtype(spec["dtype"]))
        else:
            raise InputError(f"decoder input {name!r} is not one edgec knows how to feed (optimum/onnxruntime-genai layout)")
    return feeds


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]`` under ``logits[:-1]`` (batch 1)."""
    from edgec.runtime.eval import perplexity as teacher_forced

    return teacher_forced(lambda _: logits, ids[0].tolist())
