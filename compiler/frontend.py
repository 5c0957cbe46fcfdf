"""Frontend: read an ONNX file, check it, bring it to edgec's opset, fix shapes, hand over onnx_ir.

Everything a user can get wrong about the input model is caught here, before any pass runs,
with a message that names the file and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import DecodeError

from edgec.bundle import sha256_file
from edgec.errors import ModelLoadError, ShapeError

#: Older models are brought up to this opset before the passes run; targets lower from it. Newer ones
#: (opset 21 int4 QDQ, e.g. a GGUF imported with its own 4-bit blocks) keep theirs: ONNX has no
#: down-converter for the types they use.
INTERNAL_OPSET = 18
#: Largest element count edgec accepts for one input: int32 indexing is what device runtimes use.
MAX_INPUT_ELEMENTS = 2**31 - 1


@dataclass
class SourceInfo:
    """What the manifest records about the model a bundle came from."""

    path: str
    sha256: str
    size: int
    opset: int
    producer: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Frontend:
    """The source model, read and checked: ``proto`` as given (shapes fixed), ``model`` in IR form."""

    proto: onnx.ModelProto
    model: ir.Model
    source: SourceInfo


def parse_input_shapes(specs: list[str] | tuple[str, ...], flag: str = "--input-shape") -> dict[str, list[int]]:
    """``["x=1,3,640,640"]`` -> ``{"x": [1, 3, 640, 640]}``; ``flag`` is the option named in errors."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            parsed = [int(d) for d in dims.split(",")] if sep and dims else None
        except ValueError:
            parsed = None
        if not name or parsed is None or any(not 1 <= d < 2**63 for d in parsed):  # ONNX dims are int64
            raise ShapeError(
                f"{flag} {spec!r}: expected NAME=D1,D2,... with positive integers, e.g. x=1,3,640,640"
            )
        shapes[name] = parsed
    return shapes


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (and its external data), refusing anything that is not a usable model."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory; pass the .onnx file inside it")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path}: not a readable ONNX model (truncated or not ONNX protobuf: {exc})"
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or no outputs; truncated or another format?)")
    _load_external_data(proto, path.parent)
    return proto


def _load_external_data(proto: onnx.ModelProto, base: Path) -> None:
    """Load external weights, refusing locations that point outside the model's folder."""
    tensors = [t for t in onnx.external_data_helper._get_all_tensors(proto) if onnx.external_data_helper.uses_external_data(t)]
    base = base.resolve()
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = (base / info.get("location", "")).resolve()
        if base not in location.parents:
            raise ModelLoadError(
                f"tensor {tensor.name!r}: external data location {info.get('location')!r} is outside {base}"
            )
        if not location.is_file():
            raise ModelLoadError(f"tensor {tensor.name!r}: external data file {location} is missing")
    if tensors:
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(base))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"external data of the model in {base} could not be read: {exc}") from None


def default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def to_internal_opset(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    opset = default_opset(proto)
    if opset >= INTERNAL_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, INTERNAL_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors/asserts from C++
        raise ModelLoadError(
            f"{path}: cannot convert opset {opset} to edgec's opset {INTERNAL_OPSET} ({str(exc).strip()[:200]}); "
            f"re-export the model at opset {INTERNAL_OPSET}"
        ) from None


def normalize_dynamic_dims(proto: onnx.ModelProto) -> None:
    """Exporters mark dynamic dims as -1 or 0 (Paddle does); ONNX's way is a dim without a value."""
    for value in [*proto.graph.input, *proto.graph.output]:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
                dim.dim_param = f"{value.name}_dim{i}"


def fix_input_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Write user-given shapes into the graph inputs, checking names, ranks and static dims."""
    inputs = {i.name: i for i in proto.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise ShapeError(f"--input-shape names {name!r}, but the model's inputs are {sorted(inputs)}")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) and len(shape.dim) != len(dims):
            raise ShapeError(f"--input-shape {name}: model input has rank {len(shape.dim)}, got {len(dims)} dims")
        for i, (dim, value) in enumerate(zip(shape.dim, dims)):
            if dim.HasField("dim_value") and dim.dim_value != value:
                raise ShapeError(f"--input-shape {name}: dim {i} is fixed to {dim.dim_value} in the model, got {value}")
        shape.ClearField("dim")
        for value in dims:
            shape.dim.add().dim_value = value
    if shapes:  # intermediate value_info was inferred for the old shapes; infer again from scratch
        del proto.graph.value_info[:]
        for output in proto.graph.output:
            output.type.tensor_type.ClearField("shape")


def check_input_sizes(proto: onnx.ModelProto) -> None:
    for inp in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if dims and None not in dims:
            count = math.prod(dims)
            if count > MAX_INPUT_ELEMENTS:
                raise ShapeError(
                    f"input {inp.name!r} declares shape {dims} = {count:,} elements (limit {MAX_INPUT_ELEMENTS:,}); "
                    f"fix it with --input-shape {inp.name}=..."
                )


def load(path: str | os.PathLike, input_shapes: dict[str, list[int]] | None = None) -> Frontend:
    """Read, check, convert and shape-infer ``path``; the result is ready for the pass pipeline."""
    path = Path(path)
    proto = read_onnx(path)
    opset = default_opset(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"{path}: the ONNX graph does not check: {first}") from None
    normalize_dynamic_dims(proto)
    fix_input_shapes(proto, input_shapes or {})
    check_input_sizes(proto)
    proto = to_internal_opset(proto, path)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ShapeError(f"{path}: shape inference failed with the given shapes: {str(exc).strip()[:300]}") from None
    source = SourceInfo(
        path=str(path),
        sha256=sha256_file(path),
        size=path.stat().st_size,
        opset=opset,
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        metadata={p.key: p.value for p in proto.metadata_props},
    )
    return Frontend(proto=proto, model=ir.serde.deserialize_model(proto), source=source)


def signature(values) -> list[dict]:
    """``[{"name", "dtype", "shape"}]`` of graph inputs or outputs; symbolic dims as names (None if unnamed)."""
    return [_describe(v) for v in values]


def _describe(value: ir.Value) -> dict:
    shape = None
    if value.shape is not None:
        shape = [d if isinstance(d, int) else (d.value or None) for d in value.shape]
    dtype = np.dtype(value.dtype.numpy()).name if value.dtype is not None else None
    return {"name": value.name, "dtype": dtype, "shape": shape}
