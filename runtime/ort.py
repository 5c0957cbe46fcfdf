"""The ONNX Runtime backend: sessions with recorded settings, a device-local optimized cache, kernels.

ORT optimizes a graph every time a session is created. The hardware-specific part of that
(NCHWc layouts, AVX kernels) cannot ship inside a portable bundle, so on first load the backend
saves ORT's fully optimized graph under the user's cache folder, keyed by the artifact's hash, the
ORT version and this CPU; later loads read it and skip optimization.

An entry is a folder with ``model.onnx`` and its weights in ``model.onnx.data``: ORT memory-maps
external weights instead of reading them into its heap, which an ORT-format file cannot offer (a
135M-parameter decoder peaked at 435 MB loading from .ort against 253 MB from external data).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgec.errors import InputError, RuntimeFailure

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: The settings a cpu bundle is verified with and loaded with.
DEFAULT_SETTINGS = {"graph_optimization_level": "all", "intra_op_num_threads": 0, "execution_mode": "sequential"}


def session_options(settings: dict) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[settings.get("graph_optimization_level", "all")]
    opts.intra_op_num_threads = int(settings.get("intra_op_num_threads", 0))
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if settings.get("execution_mode") == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    opts.log_severity_level = 3  # warnings about hardware-specific saved graphs are expected here
    for key, value in settings.get("config", {}).items():  # ORT session config entries, e.g. MatMulNBits accuracy
        opts.add_session_config_entry(key, str(value))
    return opts


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEC_CACHE_DIR") or Path.home() / ".cache" / "edgec")


def _cpu_key() -> str:
    """This CPU's model and feature flags: an optimized graph from another CPU must not be reused."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [l for l in info.splitlines() if l.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        lines = []
    return hashlib.sha256("\n".join([platform.machine(), platform.processor(), *lines]).encode()).hexdigest()[:16]


def create_session(model_path: Path, settings: dict, artifact_sha256: str | None = None, cache: bool = True) -> ort.InferenceSession:
    """A CPU session for ``model_path``; with ``artifact_sha256`` and ``cache``, reuse/make the optimized cache."""
    opts = session_options(settings)
    providers = ["CPUExecutionProvider"]
    try:
        if not (cache and artifact_sha256) or "EDGEC_NO_CACHE" in os.environ:
            return ort.InferenceSession(str(model_path), opts, providers=providers)
        key = f"{artifact_sha256[:32]}-ort{ort.__version__}-{_cpu_key()}-{settings.get('graph_optimization_level', 'all')}"
        cached = cache_dir() / key / CACHED_MODEL
        if cached.is_file():
            try:
                fast = session_options({**settings, "graph_optimization_level": "disable"})
                return ort.InferenceSession(str(cached), fast, providers=providers)
            except Exception:  # a cache entry that ORT refuses is rebuilt, never fatal
                shutil.rmtree(cached.parent, ignore_errors=True)
        return _session_and_cache(model_path, opts, providers, cached.parent)
    except Exception as exc:  # ORT raises its own exception types, not a common base
        if isinstance(exc, (InputError, RuntimeFailure)):
            raise
        raise RuntimeFailure(f"onnxruntime could not load {model_path}: {str(exc).strip()[:400]}") from None


#: The optimized graph inside a cache entry; its weights are in ``CACHED_MODEL + ".data"``.
CACHED_MODEL = "model.onnx"


def _session_and_cache(model_path: Path, opts: ort.SessionOptions, providers: list[str], entry: Path) -> ort.InferenceSession:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(suffix=".tmp", dir=entry.parent))
    except OSError:  # read-only home, full disk: run without a cache
        return ort.InferenceSession(str(model_path), opts, providers=providers)
    opts.optimized_model_filepath = str(tmp / CACHED_MODEL)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{CACHED_MODEL}.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = ort.InferenceSession(str(model_path), opts, providers=providers)
        try:
            tmp.rename(entry)  # atomic: a crash never leaves a half-written entry
        except OSError:  # another process filled the entry first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return session


def create_session_from_proto(proto, settings: dict | None = None) -> ort.InferenceSession:
    """A CPU session on an in-memory model (compile-time tools: calibration, accuracy search)."""
    opts = session_options(settings or DEFAULT_SETTINGS)
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's exception types have no public common base
        raise RuntimeFailure(f"onnxruntime could not load the model: {str(exc).strip()[:400]}") from None


def write_ort_format(model_path: Path, out_path: Path) -> None:
    """An ORT-format copy for ORT mobile / minimal builds, with portable (extended) optimizations only."""
    opts = session_options({"graph_optimization_level": "extended"})
    opts.optimized_model_filepath = str(out_path)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feeds)
    except Exception as exc:  # onnxruntime's Fail/InvalidArgument have no public common base
        raise RuntimeFailure(f"onnxruntime failed to run the model: {str(exc).strip()[:400]}") from None
    return dict(zip(names, values))


@lru_cache(maxsize=1)
def cpu_kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(domain, op) -> opset version ranges that the installed onnxruntime has a CPU kernel for."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            domain = "" if k.domain == "ai.onnx" else k.domain
            kernels.setdefault((domain, k.op_name), []).append(tuple(k.version_range))
    return kernels


def kernel_for(domain: str, op: str, opset: int) -> str | None:
    """A description of the CPU kernel for this op at this opset, or None if ORT has none."""
    domain = "" if domain == "ai.onnx" else domain
    if not domain and op == "Constant":
        return "no kernel needed; ORT turns Constant nodes into weights at load"
    for lo, hi in cpu_kernels().get((domain, op), []):
        if lo <= opset <= hi:
            return f"CPUExecutionProvider {op}({lo}{'+' if hi >= 2**30 else f'-{hi}'})"
    if not domain:
        import onnx  # compile-time only: keeps the runtime import light

        try:
            if onnx.defs.get_schema(op, opset, domain).has_function:
                return f"no kernel; ORT expands the ONNX function body of {op}"
        except onnx.defs.SchemaError:
            return None
    return None
