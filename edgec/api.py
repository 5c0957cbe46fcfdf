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


def load(path: str | os.PathLike, *, cache: bool = True, threads: int | None = None):
    """Open a bundle (folder or zip) and check its hashes.

    Returns a ``Model`` (``run(feeds)``), or for a decoder bundle an ``LLM`` (``generate()``, ``chat()``).
    """
    bundle = _bundle.open_bundle(path)
    if bundle.manifest.get("kind") == "decoder":
        from edgec.runtime.llm import LLM

        return LLM.from_bundle(bundle, threads=threads, cache=cache)
    return Model(bundle, cache=cache, threads=threads)
