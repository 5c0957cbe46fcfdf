"""Target-neutral passes, one concern per module, and the registry that names them."""

from __future__ import annotations

from edgec.compiler.passes.eliminate import DeadCode, Dedupe, RemoveIdentity
from edgec.compiler.passes.fold_constants import FoldConstants
from edgec.compiler.passes.fuse import FoldBatchNorm, FuseActivations
from edgec.compiler.passes.scale_shift import FoldScaleShift
from edgec.compiler.passes.shapes import ShapeCleanup
from edgec.compiler.pipeline import Pass
from edgec.errors import InputError

PASSES: dict[str, type] = {
    p.name: p
    for p in (RemoveIdentity, FoldConstants, ShapeCleanup, FoldBatchNorm, FoldScaleShift, FuseActivations, Dedupe, DeadCode)
}

#: The canonical order: clean up, fold, simplify shapes, fuse, then sweep.
DEFAULT_PASSES = list(PASSES)


def build(names: list[str], disabled: list[str] | tuple[str, ...] = ()) -> list[Pass]:
    """Instantiate passes by name, minus ``disabled``; unknown names are a usage error."""
    unknown = [n for n in [*names, *disabled] if n not in PASSES]
    if unknown:
        raise InputError(f"unknown pass {unknown[0]!r}; known passes: {', '.join(PASSES)}")
    return [PASSES[n]() for n in names if n not in disabled]
