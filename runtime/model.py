"""``Model``: a loaded bundle that runs tensors in, tensors out."""

from __future__ import annotations

import time

import numpy as np

from edgec.bundle import Bundle
from edgec.errors import BundleError
from edgec.runtime import ort as ort_backend
from edgec.signature import check_inputs


class Model:
    """A compiled model ready to run. Use ``edgec.load(path)`` to get one.

    ``run(feeds)`` checks names, dtypes and shapes against the bundle's signature before
    the backend sees them, so a wrong input gets a message rather than a backend crash.
    """

    def __init__(self, bundle: Bundle, *, cache: bool = True, threads: int | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.inputs: list[dict] = self.manifest["inputs"]
        self.outputs: list[dict] = self.manifest["outputs"]
        settings = dict(self.manifest["runtime"])
        backend = settings.pop("backend", None)
        if backend != "onnxruntime":
            raise BundleError(f"{bundle.source}: backend {backend!r} cannot run on this machine")
        if threads is not None:
            settings["intra_op_num_threads"] = threads
        start = time.perf_counter()
        self._session = ort_backend.create_session(
            bundle.artifact, settings, artifact_sha256=bundle.file_sha256(self.manifest["artifact"]), cache=cache
        )
        self.load_seconds = time.perf_counter() - start

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.bundle.source.stem)

    @property
    def metadata(self) -> dict[str, str]:
        """The source model's metadata (e.g. an OCR recognizer's character list)."""
        return self.manifest["source"].get("metadata", {})

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return ort_backend.run(self._session, check_inputs(feeds, self.inputs))

    def close(self) -> None:
        self._session = None
        self.bundle.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, target={self.bundle.target!r}, inputs={[i['name'] for i in self.inputs]})"
