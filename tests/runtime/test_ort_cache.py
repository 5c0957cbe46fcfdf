"""The device-local optimized-graph cache: filled on first load, reused, rebuilt when damaged."""

from __future__ import annotations

import numpy as np

import edgec
from edgec.runtime import ort as ort_backend


def test_cache_is_filled_reused_and_rebuilt(real_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    path = real_bundle("ocr-cls")
    x = {"x": np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)}
    with edgec.load(path, cache=False) as plain:
        expected = plain.run(x)
    assert not list(tmp_path.iterdir())
    with edgec.load(path) as first:
        np.testing.assert_allclose(first.run(x)["save_infer_model/scale_0.tmp_1"], expected["save_infer_model/scale_0.tmp_1"], atol=1e-6)
    (entry,) = tmp_path.glob(f"*/{ort_backend.CACHED_MODEL}")
    stamp = entry.stat().st_mtime_ns
    with edgec.load(path) as second:
        second.run(x)
    assert entry.stat().st_mtime_ns == stamp  # reused, not rewritten
    entry.write_bytes(b"garbage")  # a damaged entry is rebuilt, never fatal
    with edgec.load(path) as third:
        np.testing.assert_allclose(third.run(x)["save_infer_model/scale_0.tmp_1"], expected["save_infer_model/scale_0.tmp_1"], atol=1e-6)
    assert entry.read_bytes() != b"garbage"
    assert [p.name for p in tmp_path.iterdir()] == [entry.parent.name]  # no temp folders left


def test_kernel_lookup_knows_cpu_ops():
    assert ort_backend.kernel_for("", "Conv", 18).startswith("CPUExecutionProvider Conv")
    assert ort_backend.kernel_for("", "Constant", 18)
    assert ort_backend.kernel_for("com.example", "NoSuchOp", 1) is None
