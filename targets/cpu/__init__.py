"""The ``cpu`` target: x86-64 and arm64 CPUs through ONNX Runtime.

Writes ``model.onnx`` (the optimized graph, portable across CPUs and ORT builds) and
``model.ort`` (the same in ORT format, for ORT Mobile and minimal builds) plus
``required_operators.config`` for building a reduced-operator ORT. Placement checks each node
against the kernels of the onnxruntime installed here.
"""

from __future__ import annotations

import platform
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from edgec.compiler.passes import DEFAULT_PASSES
from edgec.compiler.quantize.fp16 import fp16_kernel_coverage, has_fp16_cpu_kernel, reads_or_writes_fp16
from edgec.errors import UnsupportedOpError
from edgec.runtime import ort as ort_backend
from edgec.targets.cpu.decoder import exact_projections, is_decoder, lower_attention
from edgec.targets.cpu.dynamic import lower_dynamic_matmuls
from edgec.targets.cpu.gather import lower_quantized_gathers
from edgec.targets.cpu.matmulnbits import lower_int4_matmuls
from edgec.targets.cpu.qdq_activations import lower_quantized_activations
from edgec.targets.base import Lowered, NodePlacement, node_label

#: ONNX files over this size keep their weights in an external data file (protobuf's 2 GiB limit).
EXTERNAL_DATA_THRESHOLD = 1 << 30


class CpuTarget:
    name = "cpu"
    passes = DEFAULT_PASSES
    allows_dynamic_shapes = True

    def describe(self) -> dict:
        ok, why = self.can_run_here()
        return {
            "name": self.name,
            "devices": "x86-64 and arm64 CPUs (laptops, desktops, Raspberry Pi 4/5, phones via ORT Mobile)",
            "artifact": "model.onnx + model.ort",
            "backend": f"onnxruntime {ort.__version__}",
            "dtypes": ["float32", "float16", "int8 (QDQ)", "int4 (MatMulNBits)"],
            "dynamic_shapes": True,
            "runs_here": ok,
            "why": why,
            "ops": "every op with a CPU kernel in the installed onnxruntime; others are refused at compile time",
        }

    def can_run_here(self) -> tuple[bool, str]:
        return True, f"onnxruntime {ort.__version__} CPUExecutionProvider on {platform.machine()}"

    def placement(self, model: ir.Model) -> list[NodePlacement]:
        report = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            opset = model.opset_imports.get(node.domain, model.opset_imports.get("", 0))
            kernel = ort_backend.kernel_for(node.domain, node.op_type, opset)
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            name = node_label(node)
            if kernel:
                if reads_or_writes_fp16(node) and not has_fp16_cpu_kernel(node.domain, node.op_type, opset):
                    kernel += f"; no float16 kernel on {platform.machine()}: runs in float32 via Casts onnxruntime inserts"
                report.append(NodePlacement(name, op, "cpu", kernel))
            else:
                reason = f"onnxruntime {ort.__version__} has no CPU kernel for {op} at opset {opset}"
                report.append(NodePlacement(name, op, "none", reason))
        return report

    def lower(self, model: ir.Model, out_dir: Path, options: dict) -> Lowered:
        """Rewrite QDQ into ORT's fastest kernels (in place), check every node has one, write files."""
        quant = options.get("quantization") or {}
        used = quant.get("precisions", [quant.get("mode")])  # a bundle can mix precisions per layer
        fuse_for_ort(model)
        if "int8" in used:
            lower_quantized_activations(model)
        if "int8-dynamic" in used:
            lower_dynamic_matmuls(model)
        if "int4" in used:
            lower_int4_matmuls(model, accuracy_level=_int4_level(quant))
        lower_quantized_gathers(model)
        attention = lower_attention(model)
        exact = exact_projections(model) if "int4" in used else 0
        unplaced = [p for p in self.placement(model) if p.device == "none"]
        if unplaced:
            p = unplaced[0]
            more = f" (and {len(unplaced) - 1} more nodes)" if len(unplaced) > 1 else ""
            raise UnsupportedOpError(f"node {p.node!r} ({p.op}): target cpu cannot run it: {p.reason}{more}")
        artifact = out_dir / "model.onnx"
        files = ["model.onnx"]
        proto = ir.serde.serialize_model(model)
        # A decoder's weights go beside the graph too: ORT memory-maps them instead of copying them in.
        if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD or is_decoder(model):
            ir.save(model, artifact, external_data="model.onnx.data")
            files.append("model.onnx.data")
        else:
            artifact.write_bytes(proto.SerializeToString())
        if options.get("ort_format", True):
            ort_backend.write_ort_format(artifact, out_dir / "model.ort")
            _write_required_operators(out_dir / "model.ort", out_dir / "required_operators.config")
            files += ["model.ort", "required_operators.config"]
        settings = {"backend": "onnxruntime", **ort_backend.DEFAULT_SETTINGS}
        if "int4" in used:  # also for the int4/int8 weights ORT fuses into MatMulNBits itself at load
            settings["config"] = {"session.qdq_matmulnbits_accuracy_level": _int4_level(quant)}
        if attention.get("shared_buffer"):  # the runtime binds one key/value buffer as past and present
            settings["kv_cache"] = "shared-buffer"
        notes = []
        if exact:
            notes.append(f"int4: the {exact} attention value and MLP down projections run MatMulNBits at "
                         "accuracy_level 0 (float activations); the other int4 MatMuls at the bundle's level")
        if quant.get("mode") == "fp16":
            slow = [op for op, ok in fp16_kernel_coverage(model).items() if not ok]
            if slow:
                notes.append(f"fp16: onnxruntime {ort.__version__} on {platform.machine()} has no float16 kernel for {', '.join(slow)}: "
                             "it casts them to float32 at load, so the bundle is half the size but runs no faster than float32 here")
        return Lowered(artifact="model.onnx", files=files, runtime=settings, notes=notes)


def _int4_level(quant: dict) -> int:
    """MatMulNBits accuracy level: 4 lets ORT quantize activations to int8 (fast), 0 accumulates in float."""
    return 0 if quant.get("int4_accuracy") == "exact" else 4


def fuse_for_ort(model: ir.Model) -> dict[str, int]:
    """ORT's fused transformer kernels (contrib ops): Gelu, Gelu with bias, LayerNorm/RMSNorm with skip.

    Attention is left unfused: ORT's CPU MultiHeadAttention measured slower than the plain
    MatMul/Softmax chain on MiniLM (batch 8 × 256 tokens).
    """
    from onnxscript.rewriter.ort_fusions import bias_gelu, erfgelu, gelu, rms_normalization, skip_normalization

    counts = {}
    for name, fuse in (
        ("erf_gelu", erfgelu.fuse_erfgelu),
        ("rms_normalization", rms_normalization.fuse_rms_normalization),
        ("skip_layer_normalization", skip_normalization.fuse_skip_layer_normalization),
        ("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization),
        ("gelu", gelu.fuse_gelu),
        ("bias_gelu", bias_gelu.fuse_bias_gelu),
    ):
        counts[name] = fuse(model)
    return {k: v for k, v in counts.items() if v}


def _write_required_operators(ort_model: Path, config: Path) -> None:
    """The operator list a reduced-size ORT build needs (``--include_ops_by_config``)."""
    import logging

    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    create_config_from_models([ort_model], config, enable_type_reduction=False)
