"""The contract every target implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx_ir as ir


@dataclass
class Lowered:
    """What ``Target.lower`` wrote into the bundle folder."""

    artifact: str  #: file the backend loads
    files: list[str]  #: every file written, artifact included
    runtime: dict  #: backend name and the settings the artifact was verified with
    notes: list[str] = field(default_factory=list)


@dataclass
class NodePlacement:
    node: str
    op: str
    device: str  #: where the node runs, e.g. "cpu", "ane", "npu"; "none" if nowhere
    reason: str  #: the kernel that runs it, or why it falls back / cannot run

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "device": self.device, "reason": self.reason}


def node_label(node: ir.Node) -> str:
    """The node's name, or for unnamed nodes the name of what it produces."""
    if node.name:
        return node.name
    return f"<{node.op_type} producing {node.outputs[0].name}>" if node.outputs else f"<unnamed {node.op_type}>"


class Target(Protocol):
    name: str
    #: pass names, in order, that this target wants before lowering
    passes: list[str]
    #: whether artifacts may keep symbolic (dynamic) input dims
    allows_dynamic_shapes: bool

    def describe(self) -> dict: ...

    def can_run_here(self) -> tuple[bool, str]: ...

    def placement(self, model: ir.Model) -> list[NodePlacement]: ...

    def lower(self, model: ir.Model, out_dir: Path, options: dict) -> Lowered: ...
