"""The Python API: ``compile()`` a model into a verified bundle, ``load()`` a bundle to run it.

The compiler (onnxscript, the passes) is imported only when ``compile()`` is called, so an
app that only loads and runs bundles starts fast and small.
"""

from __future__ import annotations

import os

from edgec import bundle as _bundle
from edgec.runtime.model import Model


def compile(model: str | os.PathLike, target: str = "cpu", output: str | os.PathLike | None = None, **options) -> _bundle.Bundle:
    """Compile ``model`` (an ONNX file) for ``target`` into a verified bundle at ``output``.

    See ``edgec.compiler.driver.compile_model`` for the options.
    """
    from edgec.compiler.driver import compile_model

    return compile_model(model, target, output, **options)


def load(path: str | os.PathLike, *, cache: bool = True, threads: int | None = None) -> Model:
    """Open a bundle (folder or zip), check its hashes, and return a ``Model`` ready to ``run()``."""
    return Model(_bundle.open_bundle(path), cache=cache, threads=threads)
