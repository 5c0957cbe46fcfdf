"""Generation on the real SmolLM2-135M-Instruct: chat, streaming, stops, limits, cancellation, threads,
the key/value cache against a full recompute, and perplexity of the int4 import against the float one.

The two imports (float and the GGUF's own int4 blocks) come from the session fixture ``smollm2_dirs``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgec.errors import InputError
from edgec.runtime import eval as llm_eval
from edgec.runtime.llm import LLM, Chunk, Completion, _Detokenizer, _StopText
from edgec.runtime.sampling import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
UNICODE = ("Traduis en français avec des émojis 😀👍🏽 : « Où est la bibliothèque ? » "
           "Réponds: naïve café, 日本語")


@pytest.fixture(scope="module")
def llm(smollm2_dirs) -> LLM:
    """The int4 import, what a cpu bundle runs (ORT's default int4 kernels)."""
    with LLM.from_dir(smollm2_dirs["gguf-int4"]) as model:
        yield model


@pytest.fixture(scope="module")
def llm_float(smollm2_dirs) -> LLM:
    with LLM.from_dir(smollm2_dirs["float"], cache=False) as model:
        yield model


def stream_text(chunks) -> tuple[str, list[Chunk]]:
    chunks = list(chunks)
    return "".join(c.text for c in chunks), chunks


# --- pure text handling: no model ------------------------------------------------------------------------


def test_stop_text_holds_back_what_may_start_a_stop_string():
    text = _StopText(["###", "\nUser:"])
    assert text.push("Hello #") == ("Hello ", False)  # "#" may start "###"
    assert text.push("# wor") == ("## wor", False)  # "## " is not "###"
    assert text.push("ld\nUs") == ("ld", False)
    assert text.push("e") == ("", False)
    assert text.push("r: hi") == ("", True)  # the stop string and what follows are dropped
    assert text.text == "Hello ## world"
    other = _StopText(["END"])
    assert other.push("the EN") == ("the ", False)
    assert other.flush() == "EN"  # at the end, held text is released
    assert _StopText(["ab"]).push("xxabyy") == ("xx", True)
    assert _StopText([]).push("anything") == ("anything", False)


@pytest.mark.slow
def test_detokenizer_never_splits_a_character(llm):
    ids = llm.encode(UNICODE, add_special_tokens=False)
    detok = _Detokenizer(llm.tokenizer, [])
    pieces = [detok.step(i) for i in ids]
    assert "".join(pieces) == UNICODE
    assert any(p == "" for p in pieces)  # some tokens carry half a character and wait
    assert not any("\ufffd" in p for p in pieces)
    # Starting after a prompt that ends inside a character: that prompt is not echoed.
    emoji = llm.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1
    detok = _Detokenizer(llm.tokenizer, [*llm.encode("Hi "), emoji[0]])
    assert "".join(detok.step(i) for i in llm.encode(" ok", add_special_tokens=False)) == " ok"


# --- the real model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_answers_paris(llm):
    answer = llm.chat(QUESTION, max_tokens=32)
    assert isinstance(answer, Completion)
    assert "Paris" in answer.text, answer.text
    assert answer.finish_reason == "stop" and answer.tokens[-1] in llm.eos_token_ids
    assert "<|im_end|>" not in answer.text
    prompt = llm.apply_chat_template(QUESTION)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert answer.prompt_tokens == len(llm.encode(prompt, add_special_tokens=False))
    assert answer.usage.total_tokens == answer.prompt_tokens + answer.completion_tokens == answer.prompt_tokens + len(
        answer.tokens)
    t = answer.timings
    assert 0 < t.prefill_seconds <= t.time_to_first_token <= t.total_seconds and t.decode_tokens_per_second > 0


@pytest.mark.slow
def test_streaming_matches_non_streaming(llm):
    whole = llm.generate(PROMPT, max_tokens=24)
    text, chunks = stream_text(llm.generate(PROMPT, max_tokens=24, stream=True))
    assert text == whole.text
    assert [c.token_id for c in chunks] == whole.tokens
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason == whole.finish_reason and last.usage.completion_tokens == whole.completion_tokens
    # Token ids as the prompt: the same as the text.
    assert llm.generate(llm.encode(PROMPT), max_tokens=24).tokens == whole.tokens



@pytest.mark.slow
def test_token_probabilities_on_request(llm_float):
    """probabilities=True: each chunk's probability is softmax(logits)[token] of a teacher-forced pass
    (float weights: int4 kernels quantize activations per call shape, which moves them by a few %);
    off by default (it costs a softmax over the vocabulary per token)."""
    llm = llm_float
    assert all(c.probability is None for c in llm.generate(PROMPT, max_tokens=4, stream=True))
    chunks = [c for c in llm.generate(PROMPT, max_tokens=4, stream=True, probabilities=True) if c.finish_reason is None]
    ids = llm.encode(PROMPT)
    logits = llm.logits(ids + [c.token_id for c in chunks]).astype(np.float64)
    for step, chunk in enumerate(chunks):
        row = logits[len(ids) - 1 + step]
        expected = np.exp(row[chunk.token_id] - row.max()) / np.exp(row - row.max()).sum()
        assert chunk.probability == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_stop_strings(llm):
    whole = llm.generate(PROMPT, max_tokens=24)
    assert whole.finish_reason == "length" and len(whole.tokens) == 24  # ' Paris.\n\nThe answer is: ...'
    stop = whole.text[whole.text.index("Paris") + 5:][:2]  # ".\n"
    cut = llm.generate(PROMPT, max_tokens=24, stop=["never printed", stop])
    assert cut.finish_reason == "stop"
    assert cut.text == whole.text[: whole.text.index(stop)]
    assert cut.tokens == whole.tokens[: len(cut.tokens)] and len(cut.tokens) < 24
    text, chunks = stream_text(llm.generate(PROMPT, stream=True, max_tokens=24, stop=[stop]))
    assert text == cut.text and chunks[-1].finish_reason == "stop"
    assert not any(stop[0] in c.text for c in chunks)


@pytest.mark.slow
def test_max_tokens_gives_length(llm):
    out = llm.generate("Once upon a time", max_tokens=5)
    assert (out.finish_reason, out.completion_tokens, len(out.tokens)) == ("length", 5, 5)
    one = llm.generate("Once upon a time", max_tokens=1)
    assert one.tokens == out.tokens[:1] and one.finish_reason == "length"


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=24, temperature=0.7, top_p=0.95, seed=1234)
    first = llm.generate("Write a haiku about the sea.", params)
    again = llm.generate("Write a haiku about the sea.", params)
    assert first.tokens == again.tokens and first.text == again.text
    others = {tuple(llm.generate("Write a haiku about the sea.", params, seed=s).tokens) for s in (1, 2, 3)}
    assert len(others | {tuple(first.tokens)}) > 1  # the seed matters
    text, _ = stream_text(llm.generate("Write a haiku about the sea.", params, stream=True))
    assert text == first.text


@pytest.mark.slow
def test_invalid_requests_fail_before_any_work(llm):
    with pytest.raises(InputError, match="temperature=-1"):
        llm.generate(PROMPT, temperature=-1)
    with pytest.raises(InputError, match=r"top_p=2 must be in \(0, 1\]"):
        llm.generate(PROMPT, stream=True, top_p=2)  # raised at the call, not at the first next()
    with pytest.raises(InputError, match="unknown sampling parameter"):
        llm.chat(QUESTION, temprature=0.5)
    with pytest.raises(InputError, match="token ids must be integers in 0..49151"):
        llm.generate([1, 2, 49152])
    with pytest.raises(InputError, match="messages\\[0\\] must be a dict"):
        llm.chat(["hello"])
    with pytest.raises(InputError, match="truncate='up'"):
        llm.generate(PROMPT, truncate="up")
    with pytest.raises(InputError, match="a string or a list of token ids, not NoneType"):
        llm.generate(None)
    with pytest.raises(InputError, match="the prompt is empty"):
        llm.generate([])


@pytest.mark.slow
def test_from_bundle(smollm2_dirs, tmp_path):
    from edgec.bundle import Bundle
    from edgec.errors import BundleError

    manifest = {"name": "smol", "artifact": "model.onnx", "files": {"model.onnx": {"sha256": "0" * 64}},
                "runtime": {"backend": "onnxruntime", "graph_optimization_level": "all", "intra_op_num_threads": 0}}
    folder = smollm2_dirs["gguf-int4"]
    with LLM.from_bundle(Bundle(folder, manifest, folder), threads=1) as model:
        assert model.name == "smol" and "Paris" in model.chat(QUESTION, max_tokens=16).text
    with pytest.raises(BundleError, match="no tokenizer.json; it is not a decoder bundle"):
        LLM.from_bundle(Bundle(tmp_path, manifest, tmp_path))


@pytest.mark.slow
def test_context_length_is_checked_or_truncated(llm, smollm2_dirs):
    assert llm.context_length == 8192
    long = "word " * 8200
    assert llm.count_tokens(long) > 8192
    with pytest.raises(InputError, match=r"exceeds the context length 8192.*truncate='left'"):
        llm.generate(long, max_tokens=8)
    with pytest.raises(InputError, match="exceeds the context length"):
        llm.generate(PROMPT, max_tokens=8192)

    with LLM.from_dir(smollm2_dirs["gguf-int4"], context_length=64) as small:
        text = " ".join(str(i) for i in range(100))  # digits are one token each
        ids = small.encode(text)
        assert len(ids) > 64
        with pytest.raises(InputError, match="exceeds the context length 64"):
            small.generate(text, max_tokens=8)
        out = small.generate(text, max_tokens=8, truncate="left")
        assert out.prompt_tokens == 56 and out.completion_tokens <= 8
        assert out.tokens == small.generate(ids[-56:], max_tokens=8).tokens  # the newest tokens were kept
        with pytest.raises(InputError, match="context_length=9000 must be in 2..8192"):
            LLM.from_dir(smollm2_dirs["gguf-int4"], context_length=9000)


@pytest.mark.slow
def test_cancellation(llm):
    cancel = threading.Event()
    chunks = []
    for chunk in llm.generate("Count from one to one hundred:", stream=True, max_tokens=200, cancel=cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert len(chunks) == 4 and chunks[-1].finish_reason == "cancelled" and chunks[-1].token_id is None
    assert chunks[-1].usage.completion_tokens == 3

    # Cancelled from another thread while a non-streaming call runs.
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    out = llm.generate("Count from one to one hundred:", max_tokens=1000, cancel=cancel, temperature=0.8,
                       seed=0)
    timer.join()
    assert out.finish_reason == "cancelled" and out.completion_tokens < 1000

    # Closing a stream stops it and frees the model at once.
    stream = llm.generate("Count from one to one hundred:", stream=True, max_tokens=200)
    next(stream)
    stream.close()
    done = threading.Event()
    threading.Thread(target=lambda: (llm.generate(PROMPT, max_tokens=2), done.set())).start()
    assert done.wait(10)

    # A request cancelled while it waits for the lock gives up without running.
    busy = llm.generate("Count from one to one hundred:", stream=True, max_tokens=200)
    next(busy)  # holds the lock
    cancel = threading.Event()
    cancel.set()
    waiting = llm.generate(PROMPT, cancel=cancel)
    assert waiting.finish_reason == "cancelled" and waiting.completion_tokens == 0
    busy.close()


@pytest.mark.slow
def test_unicode_streaming_never_breaks_a_character(llm):
    messages = [{"role": "user", "content": UNICODE}]
    text, chunks = stream_text(llm.chat(messages, stream=True, max_tokens=48, temperature=0.9, seed=3))
    assert not any("\ufffd" in c.text for c in chunks)
    for c in chunks:
        c.text.encode("utf-8")  # no lone surrogates either
    assert text == llm.chat(messages, max_tokens=48, temperature=0.9, seed=3).text
    assert any(ord(ch) > 127 for ch in text), text  # the answer does contain multi-byte characters


@pytest.mark.slow
def test_concurrent_calls_all_complete(llm):
    prompts = [PROMPT, "The largest planet is", "Water boils at", "def add(a, b):"]
    want = [llm.generate(p, max_tokens=12).text for p in prompts]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        if i % 2:
            results[i] = "".join(c.text for c in llm.generate(prompts[i], max_tokens=12, stream=True))
        else:
            results[i] = llm.generate(prompts[i], max_tokens=12).text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(4)] == want


@pytest.mark.slow
def test_kv_cache_matches_full_recompute(llm_float):
    """20 greedy tokens through the IOBinding cache = 20 full passes over the growing sequence."""
    ids = llm_float.encode(llm_float.apply_chat_template(QUESTION), add_special_tokens=False)
    cached = llm_float.generate(ids, max_tokens=20).tokens
    sequence, recomputed = list(ids), []
    for _ in range(len(cached)):
        token = int(llm_float.logits(sequence)[-1].argmax())  # a fresh cache every time: no reuse
        recomputed.append(token)
        sequence.append(token)
    assert recomputed == cached


@pytest.mark.slow
def test_int4_perplexity_is_close_to_float(llm, llm_float):
    from pydoc_data.topics import topics

    for topic in ("assignment", "for", "exceptions"):
        ids = llm_float.encode(topics[topic])[:384]
        reference, candidate = llm_eval.perplexity(llm_float, ids), llm_eval.perplexity(llm, ids)
        assert 3 < reference < 40, topic  # real text, a real model
        assert abs(candidate / reference - 1) < 0.05, (topic, reference, candidate)
        assert llm_eval.next_token_agreement(llm_float, llm, ids) > 0.85
    # Sessions and plain functions work too, and agree with the LLM.
    ids = llm_float.encode(topics["for"])[:64]
    session = llm_float.decoder.session
    assert llm_eval.perplexity(session, ids) == pytest.approx(llm_eval.perplexity(llm_float, ids), rel=1e-5)
    assert llm_eval.next_token_agreement(llm_float.logits, session, ids) == 1.0
    with pytest.raises(InputError, match="at least 2 tokens"):
        llm_eval.perplexity(llm_float, ids[:1])
