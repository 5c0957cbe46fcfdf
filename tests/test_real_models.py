"""The real pretrained models of DESIGN.md compile for cpu, verify, and match onnxruntime on the source."""

from __future__ import annotations

import numpy as np
import pytest

import edgec
from edgec.models import catalogue, ocr
from edgec.runtime import ort as ort_backend
from conftest import REAL_MODELS, silero_sample

pytestmark = pytest.mark.slow


def _source(name: str):
    session = ort_backend.create_session(catalogue.model_path(name), ort_backend.DEFAULT_SETTINGS, cache=False)
    return lambda feeds: ort_backend.run(session, feeds)


def _fresh_inputs(name: str) -> dict[str, np.ndarray]:
    """Inputs the verification never saw: another seed, and for OCR another shape."""
    if name.startswith("silero"):
        return silero_sample(seed=7)
    shape = {"ocr-det": [1, 3, 256, 384], "ocr-rec": [1, 3, 48, 480], "ocr-cls": [2, 3, 48, 192]}[name]
    return {"x": np.random.default_rng(7).uniform(-1, 1, shape).astype(np.float32)}


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_model_compiles_verifies_and_matches_source(real_bundle, name):
    path = real_bundle(name)
    with edgec.load(path) as model:
        m = model.manifest
        assert m["verification"]["passed"]
        assert m["placement"]["devices"] == {"cpu": sum(m["placement"]["devices"].values())}
        assert m["passes"][-1]["nodes_after"] < m["passes"][0]["nodes_before"]
        feeds = _fresh_inputs(name)
        ours, ref = model.run(feeds), _source(name)(feeds)
    assert ours.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-3, atol=1e-4)


def test_silero_state_carries_across_chunks(real_bundle):
    """Run 8 chunks feeding the state back, as a streaming VAD does: bundle and source stay together."""
    source = _source("silero-vad")
    with edgec.load(real_bundle("silero-vad")) as model:
        state_ours = state_ref = np.zeros((2, 1, 128), np.float32)
        for i in range(8):
            chunk = silero_sample(seed=i)
            ours = model.run({**chunk, "state": state_ours})
            ref = source({**chunk, "state": state_ref})
            np.testing.assert_allclose(ours["output"], ref["output"], atol=1e-5)
            state_ours, state_ref = ours["stateN"], ref["stateN"]


def _read_lines(det_run, rec_run, chars, page):
    x, scale = ocr.det_preprocess(page)
    boxes = ocr.text_boxes(det_run({"x": x}), scale)
    return [ocr.ctc_decode(rec_run({"x": ocr.rec_preprocess(page[y0:y1, x0:x1])}), chars)[0] for y0, x0, y1, x1 in boxes]


def test_ocr_bundles_read_page_like_the_source(real_bundle):
    page = catalogue.image("page")
    det_src, rec_src = _source("ocr-det"), _source("ocr-rec")
    with edgec.load(real_bundle("ocr-det")) as det, edgec.load(real_bundle("ocr-rec")) as rec:
        chars = ocr.charset(rec.metadata)
        ours = _read_lines(lambda f: det.run(f)["sigmoid_0.tmp_0"], lambda f: rec.run(f)["softmax_11.tmp_0"], chars, page)
    theirs = _read_lines(lambda f: det_src(f)["sigmoid_0.tmp_0"], lambda f: rec_src(f)["softmax_11.tmp_0"], chars, page)
    assert ours == theirs
    assert ours[0] == "Region-based segmentation"
    assert "histogram of grey values:" in ours


def test_zip_bundle_runs_like_the_folder(real_bundle, tmp_path):
    feeds = _fresh_inputs("ocr-cls")
    zipped = edgec.compile(catalogue.model_path("ocr-cls"), "cpu", tmp_path / "cls.zip", sample_shapes={"x": [1, 3, 48, 192]})
    zipped.close()
    with edgec.load(tmp_path / "cls.zip") as a, edgec.load(real_bundle("ocr-cls")) as b:
        np.testing.assert_array_equal(a.run(feeds)["save_infer_model/scale_0.tmp_1"], b.run(feeds)["save_infer_model/scale_0.tmp_1"])
