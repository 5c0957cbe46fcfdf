"""edgec: compile an ONNX model into a verified on-device bundle, then load and run it.

    bundle = edgec.compile("det.onnx", target="cpu", output="det.edgec")
    model = edgec.load("det.edgec")
    outputs = model.run({"x": image})
"""

from edgec.api import compile, load
from edgec.bundle import Bundle
from edgec.errors import EdgecError

__version__ = "0.1.0"
__all__ = ["Bundle", "CloudModel", "EdgecError", "HybridLLM", "Policy", "compile", "load", "__version__"]


def __getattr__(name: str):
    # The routing layer (httpx, the LLM runtime) is imported only when it is used.
    if name == "HybridLLM":
        from edgec.runtime.hybrid import HybridLLM

        return HybridLLM
    if name == "CloudModel":
        from edgec.runtime.cloud import CloudModel

        return CloudModel
    if name == "Policy":
        from edgec.runtime.policy import Policy

        return Policy
    raise AttributeError(f"module 'edgec' has no attribute {name!r}")
