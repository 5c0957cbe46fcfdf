"""One exception tree for everything a user can get wrong or a compile can fail on.

Every message names the thing at fault (file, node, op, target) and what to do about it.
The CLI prints the message without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations


class EdgecError(Exception):
    """Base of all edgec errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(EdgecError):
    """Bad usage or bad input: a missing file, a broken model, a wrong flag (exit code 2)."""

    exit_code = 2


class ModelLoadError(InputError):
    """The model file is missing, empty, truncated, not ONNX, or does not check."""


class ShapeError(InputError):
    """Input shapes are missing, malformed, or absurd."""


class UnsupportedOpError(InputError):
    """The target has no kernel or lowering for a node."""


class TargetError(InputError):
    """Unknown target, or a target that cannot do what was asked."""


class BundleError(InputError):
    """A bundle is missing, changed since it was written, or unsafe to open."""


class CalibrationError(InputError):
    """Calibration / sample data does not match the model's inputs."""


class OutputExistsError(InputError):
    """The output path exists and ``--force`` was not given."""


class VerificationError(EdgecError):
    """The compiled artifact disagrees with the source model beyond the tolerance."""


class RuntimeFailure(EdgecError):
    """The backend failed while running a model."""
