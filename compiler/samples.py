"""Sample inputs for verification (and later calibration): real data from ``--calib``, else generated.

``--calib`` accepts
  * a ``.npz`` file: one sample, arrays keyed by input name;
  * a folder of ``.npz`` files (one sample each), or of ``.npy`` files when the model has one input;
  * images (a file or a folder of .png/.jpg/.jpeg/.bmp) and text (a .txt of one sample per line, or a
    folder of .txt files), turned into tensors by ``edgec.compiler.readers`` as ``CalibOptions`` says.
A folder holds one kind of data. Samples are read lazily, one at a time, so a large folder never sits
in memory at once.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from edgec.compiler import readers
from edgec.compiler.readers import CalibOptions
from edgec.errors import CalibrationError, ShapeError
from edgec.signature import check_inputs, is_static, show_shape

#: Generated samples must fit in this many bytes per sample: a guard against absurd shapes.
MAX_SAMPLE_BYTES = 1 << 30


def read_calib(
    path: str | os.PathLike, signature: list[dict], limit: int | None = None, options: CalibOptions | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yield samples from ``path``, each checked against the model's input ``signature``.

    A generator: nothing is read until the first sample is asked for, and each call reads afresh.
    """
    path = Path(path)
    options = options or CalibOptions()
    kind, files = readers.list_files(path)
    options.check_applies(kind, path)
    if kind == readers.ARRAYS:
        names = [s["name"] for s in signature]
        read = ((str(file), _read_sample(file, names)) for file in files)
    else:
        # images take their H x W, text its sequence length, from --sample-shape when the model leaves them open
        signature = with_shapes(signature, options.shapes)
        read = (readers.read_images if kind == readers.IMAGES else readers.read_texts)(files, signature, options, path)
    for where, sample in itertools.islice(read, limit):
        check_sample(sample, signature, where)
        yield sample


def _read_sample(file: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        if file.suffix == ".npy":
            if len(names) != 1:
                raise CalibrationError(
                    f"{file}: a .npy file holds one array but the model has inputs {names}; use .npz keyed by input name"
                )
            return {names[0]: np.load(file, allow_pickle=False)}
        with np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationError(f"{file}: not a readable .npy/.npz file ({exc})") from None


def check_sample(sample: dict[str, np.ndarray], signature: list[dict], where: str) -> None:
    check_inputs(sample, signature, where, CalibrationError)


def dynamic_inputs(signature: list[dict]) -> list[str]:
    return [s["name"] for s in signature if not is_static(s["shape"])]


def generate(signature: list[dict], count: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Random samples for a fully static signature: floats uniform in [-1, 1], integers 0, bools False.

    Integers are zeros because ids and indices must be in range, and 0 always is.
    """
    dynamic = dynamic_inputs(signature)
    if dynamic:
        example = next(s for s in signature if s["name"] == dynamic[0])
        raise ShapeError(
            f"input {dynamic[0]!r} has dynamic shape {show_shape(example['shape'] or [])}: verification needs concrete "
            f"inputs. Fix the shape with --input-shape {dynamic[0]}=..., or keep it dynamic and give "
            f"--sample-shape {dynamic[0]}=... or real inputs with --calib"
        )
    total = sum(math.prod(s["shape"]) * np.dtype(s["dtype"]).itemsize for s in signature)
    if total > MAX_SAMPLE_BYTES:
        counts = ", ".join(f"{s['name']}: {math.prod(s['shape']):,} elements" for s in signature)
        raise ShapeError(f"one sample would take {total:,} bytes ({counts}); give smaller shapes with --input-shape")
    rng = np.random.default_rng(seed)
    for _ in range(count):
        sample = {}
        for s in signature:
            dtype = np.dtype(s["dtype"])
            if dtype.kind == "f":
                sample[s["name"]] = rng.uniform(-1, 1, s["shape"]).astype(dtype)
            else:
                sample[s["name"]] = np.zeros(s["shape"], dtype)
        yield sample


def with_shapes(signature: list[dict], shapes: dict[str, list[int]]) -> list[dict]:
    """The signature with some inputs' shapes replaced (``--sample-shape``), checked for rank."""
    out = []
    by_name = {s["name"]: s for s in signature}
    for name in shapes:
        if name not in by_name:
            raise ShapeError(f"--sample-shape names {name!r}, but the model's inputs are {sorted(by_name)}")
    for s in signature:
        if s["name"] in shapes:
            shape = shapes[s["name"]]
            if s["shape"] is not None and len(s["shape"]) != len(shape):
                raise ShapeError(f"--sample-shape {s['name']}: the input has rank {len(s['shape'])}, got {len(shape)} dims")
            for i, (dim, value) in enumerate(zip(s["shape"] or [], shape)):
                if isinstance(dim, int) and dim not in (0, value):  # as frontend.fix_input_shapes: 0 means unset
                    raise ShapeError(f"--sample-shape {s['name']}: dim {i} is fixed to {dim} in the model, got {value}")
            s = {**s, "shape": shape}
        out.append(s)
    return out
