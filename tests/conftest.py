"""Shared fixtures: a private optimized-graph cache, and real models compiled once per session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import edgec
from edgec.models import catalogue


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep ORT's optimized-graph cache out of the user's home during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEC_CACHE_DIR", str(tmp_path_factory.mktemp("edgec-cache")))
    yield
    mp.undo()


#: (catalogue name, compile options) for every real model the suite compiles.
REAL_MODELS = {
    "ocr-det": {"sample_shapes": {"x": [1, 3, 320, 320]}},
    "ocr-rec": {"sample_shapes": {"x": [1, 3, 48, 320]}},
    "ocr-cls": {"sample_shapes": {"x": [1, 3, 48, 192]}},
    "silero-vad": {"calib": "silero"},
    "silero-vad-16k": {"calib": "silero"},
}


def silero_sample(seed: int = 0) -> dict[str, np.ndarray]:
    """One 32 ms chunk at 16 kHz: a voiced-like tone in noise, with a zero recurrent state."""
    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(512)
    return {"input": audio[None].astype(np.float32), "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000)}


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory):
    """``real_bundle("ocr-rec")`` -> path of that catalogue model compiled for cpu (once per session)."""
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            tmp = tmp_path_factory.mktemp(name)
            options = dict(REAL_MODELS[name])
            if options.get("calib") == "silero":
                np.savez(tmp / "sample.npz", **silero_sample())
                options["calib"] = tmp / "sample.npz"
            bundle = edgec.compile(catalogue.model_path(name), "cpu", tmp / f"{name}.edgec", **options)
            built[name] = bundle.path
            bundle.close()
        return built[name]

    return get


@pytest.fixture(scope="session")
def smollm2_dirs(request) -> dict[str, Path]:
    """SmolLM2-135M-Instruct imported both ways ("float", "gguf-int4"), kept in the pytest cache
    until the GGUF or the importer's modules change."""
    from edgec.models import gguf, gguf_tokenizer, llama

    path = llama.smollm2_path()
    cache = Path(request.config.cache.mkdir("edgec-smollm2"))
    stat = path.stat()
    modules = [Path(m.__file__) for m in (llama, gguf_tokenizer, gguf)]
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()
                         + b"".join(p.read_bytes() for p in modules)).hexdigest()
    dirs = {}
    for weights in llama.WEIGHTS:
        out, stamp = cache / weights, cache / f"{weights}.key"
        if not (out.is_dir() and stamp.is_file() and stamp.read_text() == key):
            llama.import_gguf(path, out, weights=weights, force=True)
            stamp.write_text(key)
        dirs[weights] = out
    return dirs


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct compiled from its GGUF into the default int4 cpu bundle (once per session)."""
    from edgec.models import llama

    bundle = edgec.compile(llama.smollm2_path(), "cpu", tmp_path_factory.mktemp("smollm2") / "smol.edgec",
                           quantize="int4")
    bundle.close()
    return bundle.path
