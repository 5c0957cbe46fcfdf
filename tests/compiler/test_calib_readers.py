"""``--calib`` images and text: real photos through the PP-OCR classifier, real English through MiniLM,
the preprocessing checked by hand, streaming, and every refusal through the CLI (exit 2, one line,
nothing left behind).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper

import edgec
from edgec.cli import main
from edgec.compiler import readers, samples
from edgec.compiler.samples import CalibOptions
from edgec.models import catalogue, minilm

skimage_io = pytest.importorskip("skimage.io")
from skimage import data, transform  # noqa: E402

pytest.importorskip("tokenizers")

CLS_SHAPE = [1, 3, 48, 192]


def lines_of_english(count: int) -> list[str]:
    from pydoc_data.topics import topics

    lines = [line.strip() for line in topics["assert"].splitlines() + topics["if"].splitlines() if len(line.strip()) > 30]
    return lines[:count]


def tiny_model(path: Path, inputs: dict[str, tuple[int, list]]) -> Path:
    """``y = first input + first input``: the signature is what these tests are about."""
    first, (dtype, shape) = next(iter(inputs.items()))
    graph = helper.make_graph(
        [helper.make_node("Add", [first, first], ["y"])], "tiny",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()], [helper.make_tensor_value_info("y", dtype, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgec-tests")
    model.ir_version = 10
    onnx.save(model, path)
    return path


def write_images(folder: Path, names=("astronaut", "chelsea", "camera")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        skimage_io.imsave(folder / f"{name}.png", getattr(data, name)(), check_contrast=False)
    return folder


def signature(shape, dtype="float32", name="x") -> list[dict]:
    return [{"name": name, "dtype": dtype, "shape": shape}]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("calib") / "photos")


@pytest.fixture(scope="module")
def minilm_path(request) -> Path:
    # Under the pytest cache: build_to rebuilds only when the weights or the builder change; tokenizer.json lands beside it.
    return minilm.build_to(Path(request.config.cache.mkdir("edgec-minilm")))


# --- images --------------------------------------------------------------------------------------


def test_photos_verify_the_ocr_classifier(images, tmp_path):
    cls = catalogue.model_path("ocr-cls")
    bundle = edgec.compile(cls, "cpu", tmp_path / "cls.edgec", sample_shapes={"x": CLS_SHAPE}, calib=images, samples_count=8,
                           calib_options={"mean": 0.5, "std": 0.5, "bgr": True})  # PaddleOCR's own preprocessing
    v = bundle.manifest["verification"]
    bundle.close()
    assert (v["samples"], v["data"], v["passed"]) == (3, "calib:photos", True)


def test_input_shape_gives_the_size_too_and_samples_limits(images, tmp_path):
    result = cli("compile", catalogue.model_path("ocr-cls"), "-o", tmp_path / "cls.edgec", "--calib", images,
                 "--input-shape", "x=" + ",".join(map(str, CLS_SHAPE)), "--samples", "2", "--json")
    assert result.exit_code == 0, result.output
    assert '"samples": 2' in result.stdout and '"data": "calib:photos"' in result.stdout


def test_preprocessing_by_hand(images):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    options = CalibOptions(mean=",".join(map(str, mean)), std=std, bgr=True, shapes={"x": CLS_SHAPE})
    [sample] = samples.read_calib(images / "chelsea.png", signature([None, 3, None, None]), options=options)
    x = sample["x"]
    assert x.shape == (1, 3, 48, 192) and x.dtype == np.float32
    rgb = transform.resize(data.chelsea(), (48, 192), order=1, preserve_range=True, anti_aliasing=True) / 255
    expected = ((rgb[..., ::-1] - mean) / std).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(x, expected, atol=1e-5)
    # a flat colour survives resizing exactly: channel k is BGR's k-th value, normalized with the k-th mean/std
    flat = np.broadcast_to(np.array([10, 128, 250], np.uint8), (30, 40, 3))
    spec = readers._image_input(signature([1, 3, 8, 8]), Path("."))
    m, s = readers._normalization(options, 3)
    out = readers.preprocess(flat, spec, m, s, True, transform.resize, Path("flat.png"))
    np.testing.assert_allclose(out[0, :, 0, 0], (np.array([250, 128, 10]) / 255 - mean) / std, rtol=1e-6)


def test_defaults_are_zero_one_pixels_gray_to_rgb_and_rgba_to_rgb(tmp_path):
    skimage_io.imsave(tmp_path / "camera.png", data.camera(), check_contrast=False)
    rgba = np.dstack([data.chelsea(), np.full(data.chelsea().shape[:2], 7, np.uint8)])
    skimage_io.imsave(tmp_path / "rgba.png", rgba, check_contrast=False)
    gray, cat = (s["x"] for s in samples.read_calib(tmp_path, signature([1, 3, 32, 32])))
    assert 0 <= gray.min() and gray.max() <= 1 and gray.max() > 0.5
    np.testing.assert_array_equal(gray[0, 0], gray[0, 1])
    np.testing.assert_array_equal(gray[0, 0], gray[0, 2])
    expected = transform.resize(data.chelsea(), (32, 32), order=1, preserve_range=True, anti_aliasing=True) / 255
    np.testing.assert_allclose(cat[0], expected.transpose(2, 0, 1), atol=1e-6)


def test_layout_channels_and_dtype_follow_the_input(tmp_path):
    write_images(tmp_path, ["chelsea"])
    [nhwc] = samples.read_calib(tmp_path, signature([1, 24, 40, 3], "float16"))
    [nchw] = samples.read_calib(tmp_path, signature([1, 3, 24, 40]))
    assert nhwc["x"].shape == (1, 24, 40, 3) and nhwc["x"].dtype == np.float16
    np.testing.assert_allclose(nhwc["x"][0].astype(np.float32), nchw["x"][0].transpose(1, 2, 0), atol=1e-3)
    [one] = samples.read_calib(tmp_path, signature([1, 1, 24, 40]))
    np.testing.assert_allclose(one["x"][0, 0], nchw["x"][0].transpose(1, 2, 0) @ [0.2125, 0.7154, 0.0721], atol=1e-6)


def test_metadata_mean_std_are_used_and_flags_win(tmp_path):
    write_images(tmp_path, ["chelsea"])
    sig = signature([1, 3, 16, 16])
    [plain] = samples.read_calib(tmp_path, sig)
    meta = {"image_mean": "[0.5, 0.5, 0.5]", "image_std": "127.5"}  # 0-255 units are recognised
    [by_meta] = samples.read_calib(tmp_path, sig, options=CalibOptions(metadata=meta))
    np.testing.assert_allclose(by_meta["x"], (plain["x"] - 0.5) / 0.5, atol=1e-6)
    [flags] = samples.read_calib(tmp_path, sig, options=CalibOptions(mean=0, std=1, metadata=meta))
    np.testing.assert_array_equal(flags["x"], plain["x"])


def test_read_calib_streams_one_image_at_a_time(images, monkeypatch):
    calls = []
    real = skimage_io.imread
    monkeypatch.setattr(skimage_io, "imread", lambda f, *a, **k: calls.append(f) or real(f, *a, **k))
    sig = signature(CLS_SHAPE)
    feed = samples.read_calib(images, sig, limit=2)
    assert calls == []  # a generator: nothing read before the first sample is asked for
    next(feed)
    assert len(calls) == 1
    assert len(list(feed)) == 1 and len(calls) == 2  # the limit stops reading
    assert len(list(samples.read_calib(images, sig))) == 3 and len(calls) == 5  # each call reads from disk again
    gone = samples.read_calib(images / "nowhere", sig)  # even a missing folder is reported on first use
    with pytest.raises(edgec.errors.CalibrationError, match="no such file"):
        next(gone)


def test_arrays_still_work_and_npz_with_npy_is_one_kind(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros([1, 3, 8, 8], np.float32))
    np.savez(tmp_path / "b.npz", x=np.ones([1, 3, 8, 8], np.float32))
    (tmp_path / "README.md").write_text("not data")
    got = list(samples.read_calib(tmp_path, signature([1, 3, 8, 8])))
    assert [float(s["x"].mean()) for s in got] == [0.0, 1.0]


# --- text ----------------------------------------------------------------------------------------


def test_text_verifies_minilm(minilm_path, tmp_path):
    lines = lines_of_english(5)
    txt = tmp_path / "english.txt"
    txt.write_text("\n\n".join(lines) + "\n   \n")  # blank lines are not samples
    bundle = edgec.compile(minilm_path, "cpu", tmp_path / "minilm.edgec", calib=txt, samples_count=10)
    v = bundle.manifest["verification"]
    bundle.close()
    assert (v["samples"], v["data"], v["passed"]) == (5, "calib:english.txt", True)


def test_tokens_match_the_tokenizer(minilm_path, tmp_path):
    lines = lines_of_english(3)
    (tmp_path / "one.txt").write_text("\n".join(lines))
    sig = [{"name": n, "dtype": "int64", "shape": ["batch", "seq"]} for n in minilm.INPUT_NAMES]
    options = CalibOptions(model=minilm_path)
    got = list(samples.read_calib(tmp_path / "one.txt", sig, options=options))
    reference = minilm.encode([lines[1]], minilm.load_tokenizer(minilm_path.parent / "tokenizer.json"), 128)
    assert len(got) == 3 and got[1]["input_ids"].shape == (1, 128)  # dynamic seq: padded to the default 128
    for name in minilm.INPUT_NAMES:
        np.testing.assert_array_equal(got[1][name][:, : reference[name].shape[1]], reference[name])
    [short] = samples.read_calib(tmp_path / "one.txt", sig, limit=1, options=CalibOptions(model=minilm_path, max_length=8))
    assert short["input_ids"].shape == (1, 8) and short["input_ids"][0, -1] == 102  # truncated, ends in [SEP]
    [fixed] = samples.read_calib(tmp_path / "one.txt", sig, limit=1, options=CalibOptions(model=minilm_path, shapes={"input_ids": [1, 24]}))
    assert fixed["input_ids"].shape == (1, 24)


def test_a_folder_of_texts_is_one_sample_per_file_and_only_the_models_inputs(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, line in enumerate(lines_of_english(3)):
        (folder / f"{i}.txt").write_text(f"{line}\nand a second line\n")
    model = tiny_model(tmp_path / "ids.onnx", {"input_ids": (TensorProto.INT64, [1, 12])})
    shutil.copyfile(minilm.model_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    got = list(samples.read_calib(folder, signature([1, 12], "int64", "input_ids"), options=CalibOptions(model=model)))
    assert len(got) == 3 and all(list(s) == ["input_ids"] and s["input_ids"].shape == (1, 12) for s in got)
    bundle = edgec.compile(model, "cpu", tmp_path / "ids.edgec", calib=folder)
    assert bundle.manifest["verification"]["samples"] == 3
    bundle.close()


# --- refusals, through the CLI -------------------------------------------------------------------


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    tiny_model(tmp_path / "img.onnx", {"x": (TensorProto.FLOAT, [1, 3, 8, 8])})
    tiny_model(tmp_path / "dyn.onnx", {"x": (TensorProto.FLOAT, ["N", 3, "H", "W"])})
    tiny_model(tmp_path / "flat.onnx", {"x": (TensorProto.FLOAT, [1, 8])})
    tiny_model(tmp_path / "int4d.onnx", {"x": (TensorProto.INT64, [1, 3, 8, 8])})
    tiny_model(tmp_path / "two.onnx", {"x": (TensorProto.FLOAT, [1, 3, 8, 8]), "z": (TensorProto.FLOAT, [1, 3, 8, 8])})
    (tmp_path / "tok").mkdir()
    (tmp_path / "bert").mkdir()
    for folder in ("tok", "bert"):  # bert/ has a tokenizer.json beside the model, tok/ has none
        tiny_model(tmp_path / folder / "bert.onnx", {"input_ids": (TensorProto.INT64, [1, 8]), "attention_mask": (TensorProto.INT64, [1, 8])})
    shutil.copyfile(minilm.model_dir() / "tokenizer.json", tmp_path / "bert" / "tokenizer.json")
    write_images(tmp_path / "photos", ["chelsea"])
    (tmp_path / "lines.txt").write_text("\n".join(lines_of_english(2)))
    return tmp_path


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir()
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


def _png(path: Path) -> bytes:
    return (path / "photos" / "chelsea.png").read_bytes()


REFUSED = {
    "unreadable-image": ("img.onnx", lambda w: _folder(w / "c", {"a.png": _png(w), "broken.png": b"\x89PNG\r\n\x1a\nnot really"}),
                         [], ["broken.png", "not a readable image"]),
    "truncated-jpeg": ("img.onnx", lambda w: _folder(w / "c", {"cut.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF"}), [], ["cut.jpg", "not a readable image"]),
    "image-for-2d-input": ("flat.onnx", lambda w: w / "photos", [], ["photos", "images", "x float32 [1, 8]", "4-D float"]),
    "image-for-int-input": ("int4d.onnx", lambda w: w / "photos", [], ["images", "int64", "4-D float"]),
    "image-for-two-inputs": ("two.onnx", lambda w: w / "photos", [], ["images", "2 inputs", "one 4-D float input"]),
    "image-size-unknown": ("dyn.onnx", lambda w: w / "photos", [], ["'x'", "--sample-shape x=1,3,H,W", "--input-shape"]),
    "text-without-token-inputs": ("img.onnx", lambda w: w / "lines.txt", [], ["lines.txt", "text", "['x']", "input_ids"]),
    "tokenizer-missing": ("tok/bert.onnx", lambda w: w / "lines.txt", [], ["tokenizer.json", "--tokenizer"]),
    "tokenizer-not-found": ("tok/bert.onnx", lambda w: w / "lines.txt", ["--tokenizer", "nowhere.json"], ["--tokenizer nowhere.json", "no such file"]),
    "tokenizer-broken": ("tok/bert.onnx", lambda w: w / "lines.txt", ["--tokenizer", "lines.txt"], ["lines.txt", "tokenizer.json"]),
    "empty-folder": ("img.onnx", lambda w: _folder(w / "c", {}), [], ["--calib c", "empty"]),
    "only-blank-text": ("bert/bert.onnx", lambda w: _folder(w / "c", {"a.txt": b"\n  \n", "b.txt": b""}), [], ["--calib c", "empty"]),
    "not-utf8": ("bert/bert.onnx", lambda w: _folder(w / "c", {"a.txt": b"caf\xe9"}), [], ["a.txt", "UTF-8"]),
    "mixed-folder": ("img.onnx", lambda w: _folder(w / "c", {"a.png": _png(w), "b.npz": b"", "c.txt": b"hi"}), [],
                     ["mixes arrays (b.npz), images (a.png) and text (c.txt)"]),
    "mean-count": ("img.onnx", lambda w: w / "photos", ["--calib-mean", "0.1,0.2"], ["--calib-mean", "2 values", "3"]),
    "mean-not-numbers": ("img.onnx", lambda w: w / "photos", ["--calib-mean", "red"], ["--calib-mean", "'red'", "comma-separated"]),
    "std-zero": ("img.onnx", lambda w: w / "photos", ["--calib-std", "0"], ["--calib-std", "non-zero"]),
    "image-flags-on-arrays": ("img.onnx", lambda w: _folder(w / "c", {"a.npy": b""}), ["--calib-bgr"], ["--calib-bgr is for images", "holds arrays"]),
    "text-flags-on-images": ("img.onnx", lambda w: w / "photos", ["--calib-max-length", "9"], ["--calib-max-length is for text", "holds images"]),
    "flags-without-calib": ("img.onnx", None, ["--calib-mean", "0.5"], ["--calib-mean needs --calib"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused(case, work):
    model, make, flags, words = REFUSED[case]
    calib = ["--calib", make(work).relative_to(work)] if make else []
    result = cli("compile", work / model, "-o", "out.edgec", *calib, *flags)
    assert_refused(result, *words)


def test_missing_scikit_image_names_the_install(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.io", None)  # import fails as if not installed
    assert_refused(cli("compile", work / "img.onnx", "-o", "out.edgec", "--calib", "photos"), "pip install scikit-image")


def assert_refused(result: Result, *words: str) -> None:
    """Exit 2, one ``error:`` line holding every word, no traceback, and no output or staging folder left."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert not any(p.name.startswith(("out.edgec", ".out.edgec")) for p in Path.cwd().iterdir())
