"""edgec: compile an ONNX model into a verified on-device bundle, then load and run it.

    bundle = edgec.compile("det.onnx", target="cpu", output="det.edgec")
    model = edgec.load("det.edgec")
    outputs = model.run({"x": image})
"""

from edgec.api import compile, load
from edgec.bundle import Bundle
from edgec.errors import EdgecError

__version__ = "0.1.0"
__all__ = ["Bundle", "EdgecError", "compile", "load", "__version__"]
