"""The pass pipeline: runs passes in order, measures each one, optionally checks the model after each.

A pass is any object with a ``name``, a one-line ``summary`` and ``__call__(model) -> dict[str, int]``
that changes the ``onnx_ir`` model in place and returns counts of what it did
(``{"folded": 12}``). The pipeline adds the numbers every pass gets for free: nodes and weight
bytes before and after, and milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import onnx
import onnx_ir as ir

from edgec.errors import EdgecError


class Pass(Protocol):
    name: str
    summary: str

    def __call__(self, model: ir.Model) -> dict[str, int]: ...


@dataclass
class PassStats:
    name: str
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    ms: float
    changes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class PassCheckError(EdgecError):
    """A pass left a model that no longer checks: an edgec bug, reported with the pass name."""


def count_nodes(graph: ir.Graph) -> int:
    """Nodes in the graph and all its subgraphs (If/Loop bodies)."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(graph))


def weight_bytes(model: ir.Model) -> int:
    """Bytes of weights in the model, subgraph weights included."""
    return sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    )


def run_pipeline(
    model: ir.Model,
    passes: list[Pass],
    *,
    check_each_pass: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[PassStats]:
    """Run ``passes`` over ``model`` in place; return one ``PassStats`` per pass."""
    stats = []
    for p in passes:
        if progress:
            progress(p.name)
        nodes, size = count_nodes(model.graph), weight_bytes(model)
        start = time.perf_counter()
        changes = p(model) or {}
        ms = (time.perf_counter() - start) * 1e3
        stats.append(PassStats(p.name, nodes, count_nodes(model.graph), size, weight_bytes(model), round(ms, 2), changes))
        if check_each_pass:
            check_model(model, after=p.name)
    return stats


def check_model(model: ir.Model, after: str) -> None:
    try:
        onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PassCheckError(f"the model no longer checks after pass {after!r}: {str(exc).strip()[:300]}") from None
