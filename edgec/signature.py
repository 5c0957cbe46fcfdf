"""Input/output signatures (``[{"name", "dtype", "shape"}]``) and checking arrays against them."""

from __future__ import annotations

import numpy as np

from edgec.errors import InputError


def show_shape(shape: list | None) -> str:
    if shape is None:
        return "[any]"
    return "[" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else (d or "?") for d in shape) + "]"


def is_static(shape: list | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def check_inputs(
    feeds: dict, signature: list[dict], where: str = "inputs", error: type[InputError] = InputError
) -> dict[str, np.ndarray]:
    """Names, dtypes, ranks and static dims of ``feeds`` must match ``signature``; returns numpy arrays."""
    names = [s["name"] for s in signature]
    if sorted(feeds) != sorted(names):
        raise error(f"{where}: got inputs {sorted(feeds)}, the model's inputs are {names}")
    checked = {}
    for spec in signature:
        value = np.asarray(feeds[spec["name"]])
        if spec["dtype"] and value.dtype != np.dtype(spec["dtype"]):
            raise error(f"{where}: input {spec['name']!r} is {value.dtype}, the model expects {spec['dtype']}")
        shape = spec["shape"]
        if shape is not None and (
            value.ndim != len(shape) or any(isinstance(d, int) and d >= 0 and d != v for d, v in zip(shape, value.shape))
        ):
            raise error(
                f"{where}: input {spec['name']!r} has shape {list(value.shape)}, the model expects {show_shape(shape)}"
            )
        checked[spec["name"]] = value
    return checked
