"""Bad input, through the real CLI: exit 2 (1 for a failed compile), one line naming the culprit,
no traceback, and nothing left behind: no output, no ``.NAME.*.tmp`` staging folder, no unpacked zip.

Every model here is a tiny graph built with ``onnx.helper`` so the whole file runs in seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper

import edgec
from edgec import errors
from edgec.cli import main
from edgec.compiler import verify

SHAPE = [1, 3, 8, 8]
HUGE = 2**40  # 2^40 x 2^40 = 1,208,925,819,614,629,174,706,176 elements


def build_model(
    shape: list = SHAPE, *, nodes: list[onnx.NodeProto] | None = None, opsets: dict[str, int] | None = None,
    dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """``y = x + x`` by default; ``nodes`` replaces the body (it reads ``x`` and writes ``y``)."""
    x = helper.make_tensor_value_info("x", dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, shape)
    nodes = nodes or [helper.make_node("Add", ["x", "x"], ["y"], name="add0")]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny", [x], [y]),
        opset_imports=[helper.make_opsetid(d, v) for d, v in {"": 18, **(opsets or {})}.items()],
        producer_name="edgec-tests",
    )
    model.ir_version = 10
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result: Result, *words: str, code: int = 2) -> str:
    """Exit ``code`` with exactly one ``error:`` line on stderr that contains every word; no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exc_info  # not an exception escaping the CLI
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_left(output: Path) -> None:
    assert not output.exists()
    leftovers = sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))
    assert leftovers == []  # staging (.NAME.*.tmp) or moved-aside (.NAME.old-*) folders


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, with temporary files (unpacked zips) in a folder checked to end up empty."""
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield work
    assert list(temp.iterdir()) == [], "an unpacked bundle was left in the temporary folder"


@pytest.fixture
def model_file(workdir) -> Path:
    return save(build_model(), workdir / "tiny.onnx")


@pytest.fixture
def dynamic_model_file(workdir) -> Path:
    return save(build_model(["N", 3, 8, 8]), workdir / "dyn.onnx")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """The tiny model compiled once; tests get a copy through ``bundle``."""
    folder = tmp_path_factory.mktemp("compiled")
    edgec.compile(save(build_model(), folder / "tiny.onnx"), "cpu", folder / "tiny.edgec").close()
    return folder / "tiny.edgec"


@pytest.fixture
def bundle(compiled, workdir) -> Path:
    return Path(shutil.copytree(compiled, workdir / "tiny.edgec"))


# --- the model file ------------------------------------------------------------------------------


VALID = build_model().SerializeToString()
BAD_FILES = {
    "missing": (None, "no such file"),
    "empty": (b"", "file is empty"),
    "truncated": (VALID[: len(VALID) // 2], "ONNX model"),
    "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x08\x00\x00\x00\x08\x08\x02\x00\x00\x00", "ONNX model"),
    "text": (b"name,value\nconv,3\nthis is not a model\n", "ONNX model"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_unreadable_model_is_refused(kind, workdir):
    content, words = BAD_FILES[kind]
    model = workdir / f"{kind}.onnx"
    if content is not None:
        model.write_bytes(content)
    out = workdir / "out.edgec"
    assert_refused(cli("compile", model, "-o", out), f"{kind}.onnx", words)
    assert_nothing_left(out)


def test_directory_as_model_is_refused(workdir):
    (workdir / "export").mkdir()
    assert_refused(cli("compile", "export", "-o", "out.edgec"), "export", "must hold model.onnx")
    assert_nothing_left(workdir / "out.edgec")


def test_graph_that_does_not_check_is_refused(workdir):
    node = helper.make_node("Add", ["x", "ghost"], ["y"], name="add0")
    model = save(build_model(nodes=[node]), workdir / "broken.onnx")
    assert_refused(cli("compile", model, "-o", "out.edgec"), "broken.onnx", "does not check", "ghost")
    assert_nothing_left(workdir / "out.edgec")


def test_op_the_target_cannot_run_is_refused(workdir):
    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery0", domain="com.example")
    model = save(build_model(nodes=[node], opsets={"com.example": 1}), workdir / "custom.onnx")
    assert_refused(cli("compile", model, "-o", "out.edgec"), "'mystery0'", "com.example::NoSuchOp", "target cpu")
    assert_nothing_left(workdir / "out.edgec")


def test_dynamic_input_without_shapes_names_the_flags(dynamic_model_file, workdir):
    assert_refused(
        cli("compile", dynamic_model_file, "-o", "out.edgec"), "'x'", "--input-shape x=", "--sample-shape x=", "--calib"
    )
    assert_nothing_left(workdir / "out.edgec")


@pytest.mark.parametrize(
    "args, words",
    [
        pytest.param([], ["'x'", "[1099511627776, 1099511627776]", "1,208,925,819,614,629,174,706,176 elements"], id="declared"),
        pytest.param(["--input-shape", f"x={HUGE},{HUGE}"], ["1,208,925,819,614,629,174,706,176 elements"], id="input-shape"),
        pytest.param(["--sample-shape", f"x={HUGE},{HUGE}"], ["1,208,925,819,614,629,174,706,176 elements"], id="sample-shape"),
    ],
)
def test_absurd_shape_is_refused_without_allocating(args, words, workdir):
    shape = [HUGE, HUGE] if not args else ["N", "M"]
    model = save(build_model(shape), workdir / "huge.onnx")
    tracemalloc.start()
    try:
        result = cli("compile", model, "-o", "out.edgec", *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_refused(result, *words)
    assert peak < 256 << 20  # the sample was never materialized
    assert_nothing_left(workdir / "out.edgec")


def test_unknown_target_lists_known_targets(model_file, workdir):
    assert_refused(cli("compile", model_file, "-t", "tpu", "-o", "out.edgec"), "'tpu'", "known targets: cpu")
    assert_nothing_left(workdir / "out.edgec")


def test_unknown_pass_lists_known_passes(model_file, workdir):
    assert_refused(cli("compile", model_file, "--disable-pass", "nope", "-o", "out.edgec"), "'nope'", "known passes", "dead-code")
    assert_nothing_left(workdir / "out.edgec")


def test_output_folder_that_does_not_exist(model_file, workdir):
    assert_refused(cli("compile", model_file, "-o", "missing/out.edgec"), "missing/out.edgec", "does not exist")
    assert not (workdir / "missing").exists()


def test_zero_samples_is_a_usage_error(model_file, workdir):
    result = cli("compile", model_file, "--samples", "0", "-o", "out.edgec")
    assert result.exit_code == 2 and "--samples" in result.output and "Traceback" not in result.output
    assert_nothing_left(workdir / "out.edgec")


# --- shape flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--input-shape", "--sample-shape"])
@pytest.mark.parametrize("spec", ["x=", "x=a,b", "x=-1", "x=1,0,8,8", "x=1,,8", "x", "=1,3,8,8", f"x={10**20},3,8,8"])
def test_malformed_shape_flag(flag, spec, dynamic_model_file, workdir):
    assert_refused(cli("compile", dynamic_model_file, flag, spec, "-o", "out.edgec"), f"{flag} {spec!r}", "NAME=D1,D2")
    assert_nothing_left(workdir / "out.edgec")


@pytest.mark.parametrize(
    "flag, spec, words",
    [
        ("--input-shape", "nope=1,3,8,8", ["--input-shape names 'nope'", "['x']"]),
        ("--sample-shape", "nope=1,3,8,8", ["--sample-shape names 'nope'", "['x']"]),
        ("--input-shape", "x=1,3,8", ["--input-shape x", "rank 4, got 3 dims"]),
        ("--sample-shape", "x=1,3,8", ["--sample-shape x", "rank 4, got 3 dims"]),
        ("--input-shape", "x=2,3,9,8", ["--input-shape x", "dim 2 is fixed to 8 in the model, got 9"]),
        ("--sample-shape", "x=2,3,9,8", ["--sample-shape x", "dim 2 is fixed to 8 in the model, got 9"]),
    ],
)
def test_shape_flag_that_does_not_fit_the_model(flag, spec, words, dynamic_model_file, workdir):
    assert_refused(cli("compile", dynamic_model_file, flag, spec, "-o", "out.edgec"), *words)
    assert_nothing_left(workdir / "out.edgec")


# --- existing output -----------------------------------------------------------------------------


def test_existing_output_needs_force(model_file, workdir):
    out = workdir / "out.edgec"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(cli("compile", model_file, "-o", out), "out.edgec exists", "--force")
    assert (out / "keep.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("old", ["folder", "file"])
def test_force_replaces_existing_output(old, model_file, workdir):
    out = workdir / "out.edgec"
    if old == "folder":
        out.mkdir()
        (out / "stale.txt").write_text("old")
    else:
        out.write_text("old")
    result = cli("compile", model_file, "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert out.is_dir() and not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []
    assert cli("inspect", out).exit_code == 0  # no unlisted leftovers from the old content


def test_failed_compile_with_force_keeps_the_old_output(bundle, workdir):
    before = {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    (workdir / "empty.onnx").write_bytes(b"")
    assert_refused(cli("compile", "empty.onnx", "-o", bundle, "--force"), "empty.onnx", "empty")
    assert {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []


# --- bundles changed after compiling, or unsafe to open ------------------------------------------


def _flip_byte(bundle: Path) -> None:
    artifact = bundle / "model.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))


TAMPERING = {
    "flipped-byte": (_flip_byte, ["model.onnx", "changed after compiling"]),
    "extra-file": (lambda b: (b / "extra.bin").write_bytes(b"\0"), ["extra.bin", "not listed"]),
    "missing-file": (lambda b: (b / "model.ort").unlink(), ["model.ort", "missing"]),
}


@pytest.mark.parametrize("command", [["inspect"], ["run", "-i", "x.npy"]], ids=["inspect", "run"])
@pytest.mark.parametrize("change", TAMPERING)
def test_changed_bundle_is_refused(change, command, bundle, workdir):
    np.save(workdir / "x.npy", np.zeros(SHAPE, np.float32))
    tamper, words = TAMPERING[change]
    tamper(bundle)
    assert_refused(cli(command[0], bundle, *command[1:]), "tiny.edgec", *words)


@pytest.mark.parametrize("change", ["flipped-byte", "extra-file"])
def test_changed_zip_bundle_is_refused(change, bundle, workdir):
    TAMPERING[change][0](bundle)
    archive = workdir / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(bundle.rglob("*")):
            zf.write(p, p.relative_to(bundle).as_posix())
    assert_refused(cli("inspect", archive), "tiny.zip", *TAMPERING[change][1])


def _zip_with(bundle: Path, archive: Path, name: str, symlink: bool = False) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(bundle.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(bundle).as_posix())
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd" if symlink else "pwned")


@pytest.mark.parametrize("command", ["inspect", "run"])
@pytest.mark.parametrize("entry", ["../evil.txt", "reports/../../evil.txt", "ABSOLUTE", "C:/evil.txt", "..\\evil.txt", "LINK"])
def test_zip_entry_escaping_the_bundle_is_refused(entry, command, bundle, tmp_path, workdir):
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "evil-absolute.txt")
    archive = workdir / "evil.zip"
    _zip_with(bundle, archive, "evil-link" if entry == "LINK" else entry, symlink=entry == "LINK")
    words = ["symbolic link"] if entry == "LINK" else [repr(entry), "escapes the bundle folder"]
    assert_refused(cli(command, archive), "evil.zip", *words)
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == ["evil.zip"]  # nothing unpacked anywhere


@pytest.mark.parametrize(
    "make, words",
    [
        pytest.param(lambda w: w / "nothing.edgec", ["nothing.edgec", "no such bundle"], id="missing"),
        pytest.param(lambda w: _file(w / "plain.edgec", b"hello"), ["plain.edgec", "not a bundle"], id="plain-file"),
        pytest.param(lambda w: _folder(w / "empty.edgec"), ["empty.edgec", "no manifest.json"], id="no-manifest"),
        pytest.param(lambda w: _folder(w / "bad.edgec", {"manifest.json": b"{"}), ["bad.edgec", "not valid JSON"], id="bad-json"),
        pytest.param(
            lambda w: _folder(w / "new.edgec", {"manifest.json": b'{"schema_version": 99, "files": {}, "artifact": "m"}'}),
            ["new.edgec", "schema version 99"], id="newer-schema",
        ),
        pytest.param(lambda w: _file(w / "cut.zip", b"PK\x03\x04" + b"\0" * 40), ["cut.zip", "not a bundle"], id="damaged-zip"),
    ],
)
def test_not_a_bundle(make, words, workdir):
    assert_refused(cli("inspect", make(workdir)), *words)


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder(path: Path, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir()
    for name, data in (files or {}).items():
        (path / name).write_bytes(data)
    return path


# --- running a bundle on wrong inputs ------------------------------------------------------------


RUN_INPUTS = {
    "wrong-dtype": (lambda w: np.save(w / "x.npy", np.zeros(SHAPE, np.float64)), ["-i", "x.npy"], ["'x'", "float64", "expects float32"]),
    "wrong-shape": (lambda w: np.save(w / "x.npy", np.zeros([1, 3, 4, 4], np.float32)), ["-i", "x.npy"], ["'x'", "[1, 3, 4, 4]", "[1, 3, 8, 8]"]),
    "wrong-rank": (lambda w: np.save(w / "x.npy", np.zeros([3, 8, 8], np.float32)), ["-i", "x.npy"], ["'x'", "[3, 8, 8]", "[1, 3, 8, 8]"]),
    "wrong-name": (lambda w: np.savez(w / "in.npz", z=np.zeros(SHAPE, np.float32)), ["-i", "in.npz"], ["['z']", "inputs are ['x']"]),
    "no-input": (lambda w: None, [], ["no inputs given", "['x']", "--input"]),
    "missing-file": (lambda w: None, ["-i", "x=nope.npy"], ["--input x=nope.npy", "no such file"]),
    "not-npy": (lambda w: (w / "x.npy").write_text("1,2,3"), ["-i", "x.npy"], ["--input x.npy", "not a readable .npy/.npz"]),
}


@pytest.mark.parametrize("case", RUN_INPUTS)
def test_run_refuses_wrong_inputs(case, bundle, workdir):
    prepare, args, words = RUN_INPUTS[case]
    prepare(workdir)
    assert_refused(cli("run", bundle, *args, "--output-dir", "outs"), *words)
    assert not (workdir / "outs").exists()


# --- calibration data ----------------------------------------------------------------------------


CALIB = {
    "empty-folder": (lambda w: _folder(w / "calib"), ["--calib", "calib", "empty"]),
    "folder-without-arrays": (lambda w: _folder(w / "calib", {"notes.txt": b"hi"}), ["calib", "no .npz or .npy"]),
    "missing": (lambda w: w / "nowhere", ["--calib", "nowhere", "no such file"]),
    "wrong-name": (lambda w: _savez(w / "c.npz", z=np.zeros(SHAPE, np.float32)), ["c.npz", "['z']", "['x']"]),
    "wrong-dtype": (lambda w: _savez(w / "c.npz", x=np.zeros(SHAPE, np.int64)), ["c.npz", "'x'", "int64", "float32"]),
    "wrong-shape": (lambda w: _savez(w / "c.npz", x=np.zeros([2, 3, 8, 8], np.float32)), ["c.npz", "'x'", "[2, 3, 8, 8]"]),
    "not-npz": (lambda w: _file(w / "c.npz", b"not a zip"), ["c.npz", "not a readable"]),
}


def _savez(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", CALIB)
def test_bad_calibration_data(case, model_file, workdir):
    make, words = CALIB[case]
    calib = make(workdir)
    assert_refused(cli("compile", model_file, "--calib", calib, "-o", "out.edgec"), *words)
    assert_nothing_left(workdir / "out.edgec")


# --- a failed verification -----------------------------------------------------------------------


def test_failed_verification_exits_1_and_leaves_nothing(model_file, workdir, monkeypatch):
    """A miscompiled artifact, simulated: its outputs are shifted by 0.5 before the comparison.

    ``--tolerance 0`` on a real rounding difference would depend on which kernels this ORT build
    picks; shifting the artifact's outputs fails the real ``compare`` the same way on every machine.
    """
    real_compare = verify.compare

    def miscompiled(source, artifact, samples, **kw):
        return real_compare(source, lambda f: {k: v + 0.5 for k, v in artifact(f).items()}, samples, **kw)

    monkeypatch.setattr(verify, "compare", miscompiled)
    for out in (workdir / "out.edgec", workdir / "out.zip"):
        assert_refused(
            cli("compile", model_file, "-o", out), "verification failed", "output 'y'", "by 0.5", "tolerance 0.001", code=1
        )
        assert_nothing_left(out)


# --- the happy path a bad-input test is measured against -----------------------------------------


def test_zip_bundle_round_trip(dynamic_model_file, workdir):
    result = cli("compile", dynamic_model_file, "-o", "dyn.zip", "--sample-shape", "x=2,3,8,8")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["dyn.onnx", "dyn.zip"]
    x = np.random.default_rng(0).uniform(-1, 1, [5, 3, 8, 8]).astype(np.float32)
    np.save(workdir / "x.npy", x)
    result = cli("run", "dyn.zip", "-i", "x.npy", "--output-dir", "outs")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(workdir / "outs" / "y.npy"), x + x)
    result = cli("inspect", "dyn.zip")
    assert result.exit_code == 0, result.output
    assert "dyn" in result.output and "passed" in result.output


# --- the Python API raises the same typed errors -------------------------------------------------


def test_api_raises_typed_errors(bundle, model_file, workdir):
    with pytest.raises(errors.ModelLoadError, match="no such file"):
        edgec.compile(workdir / "nope.onnx", "cpu", workdir / "out.edgec")
    with pytest.raises(errors.TargetError, match="known targets: cpu"):
        edgec.compile(model_file, "tpu", workdir / "out.edgec")
    with pytest.raises(errors.OutputExistsError, match="--force"):
        edgec.compile(model_file, "cpu", bundle)
    with edgec.load(bundle) as model, pytest.raises(errors.InputError, match="float64"):
        model.run({"x": np.zeros(SHAPE, np.float64)})
    _flip_byte(bundle)
    with pytest.raises(errors.BundleError, match="changed after compiling") as info:
        edgec.load(bundle)
    assert info.value.exit_code == 2
    assert_nothing_left(workdir / "out.edgec")


# --- --debug -------------------------------------------------------------------------------------


def test_debug_lets_the_exception_through(workdir):
    result = cli("--debug", "compile", "nope.onnx", "-o", "out.edgec")
    assert isinstance(result.exception, errors.ModelLoadError) and "nope.onnx: no such file" in str(result.exception)
    assert_nothing_left(workdir / "out.edgec")


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_traceback_only_with_debug(debug, workdir):
    """In a real process: the default prints one line; --debug prints the traceback."""
    args = [sys.executable, "-c", "from edgec.cli import main; main()", *(["--debug"] if debug else []), "inspect", "nope.edgec"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (1 if debug else 2)  # an uncaught exception exits 1
    assert proc.stdout == ""
    if debug:
        assert "Traceback" in proc.stderr and "edgec.errors.BundleError: nope.edgec: no such bundle" in proc.stderr
    else:
        assert proc.stderr == "error: nope.edgec: no such bundle\n"
