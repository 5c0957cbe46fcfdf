"""Checking a decoder on real text: perplexity and next-token agreement against a reference.

The compiler verifies a compiled decoder with these against the float reference of the same
weights, on token ids of real text (``pydoc_data.topics``)::

    ids = reference_llm.encode(text)[:512]
    ppl_ref, ppl = perplexity(reference_session, ids), perplexity(candidate_session, ids)
    agreement = next_token_agreement(reference_session, candidate_session, ids)

A "model" argument is an ``LLM``, an ``onnxruntime.InferenceSession`` of a decoder in the
optimum/genai layout, or any function ``token_ids -> logits [len(token_ids), vocab]`` (teacher-forced:
row t predicts token t + 1).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np

from edgec.errors import InputError

LogitsFn = Callable[[Sequence[int]], np.ndarray]
#: Tokens per run when driving a session: bounds attention and logits memory ([chunk, vocab] floats).
CHUNK = 256


def logits_fn(model: Union[LogitsFn, object]) -> LogitsFn:
    """``model`` as a function from token ids to teacher-forced logits [n, vocab] (float32)."""
    import onnxruntime as ort

    from edgec.runtime.kv_cache import DecoderSession
    from edgec.runtime.llm import LLM

    if isinstance(model, LLM):
        return model.logits
    if isinstance(model, ort.InferenceSession):
        decoder = DecoderSession(model)
        return lambda ids: decoder.prefill(list(ids), decoder.new_cache(len(ids)), chunk=CHUNK, all_logits=True)
    if callable(model):
        return model
    raise InputError(f"expected an LLM, an onnxruntime session or a logits function, not {type(model).__name__}")


def _ids(token_ids: Sequence[int]) -> list[int]:
    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise InputError("need at least 2 tokens to score next-token predictions")
    return ids


def _logits(fn: LogitsFn, ids: list[int]) -> np.ndarray:
    logits = np.asarray(fn(ids), dtype=np.float32)
    if logits.ndim == 3 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.ndim != 2 or logits.shape[0] != len(ids):
        raise InputError(f"a logits function returned shape {logits.shape}; expected [{len(ids)}, vocab]")
    return logits


def token_log_probs(model: Union[LogitsFn, object], token_ids: Sequence[int]) -> np.ndarray:
    """log p(token[t + 1] | tokens[:t + 1]) for t = 0 .. n-2, in float64."""
    ids = _ids(token_ids)
    logits = _logits(logits_fn(model), ids)[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logits[np.arange(len(ids) - 1), ids[1:]] - log_z


def perplexity(model: Union[LogitsFn, object], token_ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of each token after the first, given the ones before it."""
    return float(np.exp(-token_log_probs(model, token_ids).mean()))


def next_token_agreement(reference: Union[LogitsFn, object], candidate: Union[LogitsFn, object],
                         token_ids: Sequence[int]) -> float:
    """Share of positions where both models' most likely next token is the same (teacher-forced on
    ``token_ids``, so one early disagreement does not derail the rest)."""
    ids = _ids(token_ids)
    want = _logits(logits_fn(reference), ids).argmax(-1)
    got = _logits(logits_fn(candidate), ids).argmax(-1)
    return float((want == got).mean())
