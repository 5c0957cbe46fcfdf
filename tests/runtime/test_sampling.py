"""The sampler on fixed logits: each filter's mask, the penalty's arithmetic, seeds, and bad values."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.errors import InputError
from edgec.runtime.sampling import (
    MAX_STOP_STRINGS,
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    candidates,
    softmax,
)

#: Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 spread over a 6-token vocabulary (token 5 impossible).
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15, 0.0])
LOGITS = np.log(np.where(PROBS > 0, PROBS, 1e-30)).astype(np.float32)


def kept(**filters) -> set[int]:
    ids, _ = candidates(LOGITS, **filters)
    return set(ids.tolist())


def test_top_k_keeps_the_k_largest():
    assert kept(top_k=1) == {1}
    assert kept(top_k=3) == {1, 3, 4}
    assert kept(top_k=0) == kept(top_k=6) == set(range(6))


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    assert kept(top_p=0.39) == {1}  # 0.4 alone reaches 0.39
    assert kept(top_p=0.41) == {1, 3}
    assert kept(top_p=0.69) == {1, 3}
    assert kept(top_p=0.71) == {1, 3, 4}
    assert kept(top_p=0.01) == {1}  # never empty
    assert kept(top_p=1.0) == set(range(6))


def test_min_p_is_relative_to_the_most_likely():
    assert kept(min_p=0.3) == {1, 3, 4}  # threshold 0.12
    assert kept(min_p=0.26) == {1, 3, 4}  # threshold 0.104: 0.1 is out
    assert kept(min_p=0.2) == {0, 1, 3, 4}  # threshold 0.08
    assert kept(min_p=0.99) == {1}


def test_filters_compose_in_order():
    # top-p renormalizes over what top-k left: 0.4, 0.3, 0.15 become 0.47, 0.35, 0.18.
    assert kept(top_k=3, top_p=0.71) == {1, 3}
    assert kept(top_k=3, top_p=0.83) == {1, 3, 4}
    assert kept(top_k=2, top_p=0.99) == {1, 3}
    assert kept(top_k=4, min_p=0.3) == {1, 3, 4}


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    rng = np.random.default_rng(0)
    for scale in (0.5, 3.0, 8.0):  # flat (full sort needed) to peaked (first look suffices)
        logits = (rng.standard_normal(50_000) * scale).astype(np.float32)
        for p in (0.5, 0.9, 0.999):
            ids, _ = candidates(logits, top_p=p)
            probs = softmax(logits.astype(np.float64))
            order = np.argsort(-probs, kind="stable")
            want = order[: int(np.searchsorted(np.cumsum(probs[order]), p) + 1)]
            assert set(ids.tolist()) == set(want.tolist()), (scale, p)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.0], np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1, 4, 99], 2.0)  # repeats count once; out-of-range ignored
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0, 0.0])
    np.testing.assert_allclose(apply_repetition_penalty(logits, [0, 1], 0.5), [4.0, -1.0, 1.0, -1.0, 0.0])
    assert logits[0] == 2.0  # the input is not changed


def test_greedy_is_argmax_after_the_penalty():
    sampler = Sampler(SamplingParams(temperature=0))
    assert sampler(LOGITS) == 1
    logits = np.array([3.0, 2.9, 0.0], np.float32)
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0]) == 1  # 3.0/1.5 < 2.9


def test_sampling_follows_the_distribution_and_the_seed():
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [Sampler(params)(LOGITS) for _ in range(3)]
    assert len(set(draws)) == 1  # a new sampler with the same seed repeats itself
    sampler = Sampler(params)
    counts = np.bincount([sampler(LOGITS) for _ in range(20_000)], minlength=6) / 20_000
    np.testing.assert_allclose(counts, PROBS, atol=0.015)
    assert counts[5] == 0
    hot = Sampler(SamplingParams(temperature=100.0, top_k=2, seed=1))  # near-uniform over the two kept
    counts = np.bincount([hot(LOGITS) for _ in range(4_000)], minlength=6) / 4_000
    assert set(np.flatnonzero(counts)) == {1, 3} and abs(counts[1] - 0.5) < 0.05
    cold = Sampler(SamplingParams(temperature=0.01, seed=1))  # p(3)/p(1) = (3/4)^100
    assert {cold(LOGITS) for _ in range(200)} == {1}


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.1), "temperature=-0.1 must be >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(top_k=2.5), "top_k=2.5 must be an integer"),
    (dict(min_p=1.0), r"min_p=1.0 must be in \[0, 1\)"),
    (dict(min_p=-0.1), r"min_p=-0.1 must be in \[0, 1\)"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
    (dict(max_tokens=0), "max_tokens=0 must be at least 1"),
    (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
    (dict(seed=-3), "seed=-3 must be a non-negative integer"),
    (dict(stop=[""]), "stop strings must not be empty"),
    (dict(stop=["x" * 300]), "at most 256 characters"),
    (dict(stop=["s"] * (MAX_STOP_STRINGS + 1)), f"at most {MAX_STOP_STRINGS} are allowed"),
    (dict(stop=[3]), "must be a string or a list of strings"),
])
def test_invalid_values_are_named(bad, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**bad).validate()


def test_overrides():
    params = SamplingParams(temperature=0.7).with_overrides(max_tokens=5, stop="\n", top_p=None)
    assert (params.max_tokens, params.temperature, params.top_p) == (5, 0.7, 1.0)
    assert params.validate().stop == ["\n"]
    with pytest.raises(InputError, match="unknown sampling parameter.*temprature"):
        SamplingParams().with_overrides(temprature=1.0)
    with pytest.raises(InputError, match="max_tokens=0 must be at least 1; top_k=-2 must be >= 0"):
        SamplingParams(max_tokens=0, top_k=-2).validate()  # every problem at once
