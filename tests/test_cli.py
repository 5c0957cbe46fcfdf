"""The CLI's happy paths on a real model: compile -> inspect -> run -> bench, and targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgec.cli import main
from edgec.models import catalogue

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cls_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "cls.edgec"
    result = CliRunner().invoke(main, ["compile", str(catalogue.model_path("ocr-cls")), "-o", str(out), "--sample-shape", "x=1,3,48,192"])
    assert result.exit_code == 0, result.output
    assert "cls.edgec" in result.output and "verified on 4 generated samples" in result.output
    return out


def test_compile_json_prints_manifest(tmp_path):
    out = tmp_path / "cls.edgec"
    result = CliRunner().invoke(
        main, ["compile", str(catalogue.model_path("ocr-cls")), "-o", str(out), "--input-shape", "x=1,3,48,192", "--json", "--check-each-pass"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 3, 48, 192]}]
    assert manifest["target"] == "cpu" and manifest["verification"]["passed"]
    assert {p["name"] for p in manifest["passes"]} >= {"fold-constants", "fold-batchnorm", "fuse-activations", "dead-code"}
    assert set(manifest["files"]) >= {"model.onnx", "model.ort", "required_operators.config", "reports/placement.json"}


def test_inspect_shows_everything(cls_bundle):
    result = CliRunner().invoke(main, ["inspect", str(cls_bundle)])
    assert result.exit_code == 0, result.output
    for word in ("signature", "passes", "fold-batchnorm", "verification", "placement by op", "HardSwish", "model.ort"):
        assert word in result.output
    data = json.loads(CliRunner().invoke(main, ["inspect", str(cls_bundle), "--json", "--nodes"]).output)
    assert all(n["device"] == "cpu" and n["reason"] for n in data["placement_nodes"])


def test_run_writes_outputs(cls_bundle, tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(main, ["run", str(cls_bundle), "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "out").iterdir()
    probs = np.load(written)
    assert probs.shape == (1, 2) and np.isclose(probs.sum(), 1, atol=1e-5)


def test_bench_against_source(cls_bundle):
    result = CliRunner().invoke(
        main, ["bench", str(cls_bundle), "--baseline", str(catalogue.model_path("ocr-cls")), "--shape", "x=1,3,48,192", "--repeats", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    for side in ("bundle", "baseline"):
        assert r[side]["p90_ms"] >= r[side]["p50_ms"] > 0 and r[side]["peak_rss_mb"] > 0 and r[side]["load_ms"] > 0
    assert r["latency_ratio"] > 0 and r["load_ratio"] > 0


def test_targets_lists_cpu():
    result = CliRunner().invoke(main, ["targets", "--json"])
    assert result.exit_code == 0
    (cpu,) = [t for t in json.loads(result.output) if t["name"] == "cpu"]
    assert cpu["runs_here"] is True
