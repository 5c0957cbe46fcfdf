"""A small real classifier for quantization accuracy tests: a CNN trained on scikit-learn's digits.

The model is ``tests/fixtures/digits_cnn.onnx`` (made by ``tools/train_digits_cnn.py``); it takes
``image`` float32 [batch, 1, 8, 8] scaled to [0, 1] (pixel / 16) and returns ``logits`` [batch, 10].
Needs scikit-learn (``pip install scikit-learn``) for the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgec.errors import InputError

FIXTURE = Path("tests") / "fixtures" / "digits_cnn.onnx"


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 NCHW images / 16 and int64 labels, 1437 / 360.

    The same split the model was trained and scored on:
    ``train_test_split(test_size=0.2, stratify=y, random_state=0)``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("edgec.models.digits needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, y_train, x_test, y_test


def model_path(repo_root: str | Path | None = None) -> Path:
    """Path of ``digits_cnn.onnx``: in ``repo_root``'s tests/fixtures, else in this checkout's."""
    root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[1]
    path = root / FIXTURE
    if not path.is_file():
        raise InputError(
            f"digits CNN fixture not found at {path}: it lives in an edgec source checkout's "
            f"tests/fixtures, not in the installed package; pass repo_root=<checkout>, "
            f"or rebuild it with `python tools/train_digits_cnn.py`"
        )
    return path
