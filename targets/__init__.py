"""Targets: each one lowers the IR to an artifact for one kind of device and says what runs where.

A target has a ``name``, ``describe()``, the ``passes`` it wants, ``lower()``, ``placement()``,
and the ``backend`` that runs its artifact (with ``can_run_here()`` saying whether it can here).
"""

from __future__ import annotations

from edgec.errors import TargetError
from edgec.targets.base import Target
from edgec.targets.cpu import CpuTarget

TARGETS: dict[str, type[Target]] = {CpuTarget.name: CpuTarget}


def get(name: str) -> Target:
    try:
        return TARGETS[name]()
    except KeyError:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} (see `edgec targets`)") from None


__all__ = ["TARGETS", "Target", "get"]
