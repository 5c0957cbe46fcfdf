"""Sampling settings and the sampler that turns one step's logits into the next token.

The chain, in order (Hugging Face's and llama.cpp's conventions where they agree):

    repetition penalty   logit / p if logit > 0 else logit * p, once per distinct token already seen
    temperature == 0     greedy: argmax (after the penalty), the rest of the chain is skipped
    temperature          logits / T
    top-k                keep the k largest
    top-p                keep the smallest set of most likely tokens whose probability reaches p
    min-p                keep tokens with probability >= min_p * the most likely token's
    sample               one draw from the kept tokens, renormalized, with the seeded generator

Every step is vectorized numpy over the vocabulary. With top-k or top-p set, the work after the
temperature happens on a small candidate set found with ``argpartition``, not on a full sort.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable

import numpy as np

from edgec.errors import InputError

#: Limits on stop strings: each one is searched for after every token.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
#: With top-p, the most likely 1024 tokens are looked at first, then 8192; the full vocabulary is
#: sorted only when they do not reach p.
_TOP_P_LOOKS = (1024, 8192)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``validate()`` checks the values; ``LLM.generate`` calls it.

    ``temperature=0`` is greedy decoding; ``top_k=0``, ``top_p=1``, ``min_p=0`` and
    ``repetition_penalty=1`` switch those filters off. ``seed=None`` draws fresh entropy, so two calls
    differ; a fixed seed makes sampling reproducible. ``stop`` lists strings that end the text
    (the stop string itself is not returned); a single string is accepted too.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> SamplingParams:
        """Raise ``InputError`` naming every invalid value; returns ``self`` for chaining."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []

        def number(name: str, integer: bool = False) -> float | None:
            value = getattr(self, name)
            ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
            if isinstance(value, bool) or not ok or not np.isfinite(value):
                problems.append(f"{name}={value!r} must be a{'n integer' if integer else ' finite number'}")
                return None
            return value

        if (v := number("max_tokens", integer=True)) is not None and v < 1:
            problems.append(f"max_tokens={v} must be at least 1")
        if (v := number("temperature")) is not None and v < 0:
            problems.append(f"temperature={v} must be >= 0 (0 is greedy)")
        if (v := number("top_k", integer=True)) is not None and v < 0:
            problems.append(f"top_k={v} must be >= 0 (0 switches it off)")
        if (v := number("top_p")) is not None and not 0 < v <= 1:
            problems.append(f"top_p={v} must be in (0, 1] (1 switches it off)")
        if (v := number("min_p")) is not None and not 0 <= v < 1:
            problems.append(f"min_p={v} must be in [0, 1) (0 switches it off)")
        if (v := number("repetition_penalty")) is not None and v <= 0:
            problems.append(f"repetition_penalty={v} must be > 0 (1 switches it off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            problems.append(f"seed={self.seed!r} must be a non-negative integer or None")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            problems.append(f"stop={self.stop!r} must be a string or a list of strings")
        else:
            if len(self.stop) > MAX_STOP_STRINGS:
                problems.append(f"{len(self.stop)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
            if any(not s for s in self.stop):
                problems.append("stop strings must not be empty")
            if any(len(s) > MAX_STOP_LENGTH for s in self.stop):
                problems.append(f"stop strings must be at most {MAX_STOP_LENGTH} characters long")
            self.stop = list(self.stop)
        if problems:
            raise InputError("invalid sampling parameters: " + "; ".join(problems))
        return self

    def with_overrides(self, **overrides: Any) -> SamplingParams:
        """A copy with ``overrides`` applied (``None`` values are ignored); unknown names are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks tokens from logits according to ``params``, with its own seeded ``numpy`` generator.

    Not thread-safe: one sampler per generation.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: Iterable[int] | np.ndarray = ()) -> int:
        """The next token for a step's ``logits`` [vocab], given the tokens seen so far (for the penalty)."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, previous, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        ids, scaled = candidates(logits / np.float32(p.temperature), p.top_k, p.top_p, p.min_p)
        probs = softmax(scaled)
        # Inverse CDF in float64: one uniform draw, no per-token Python work.
        cdf = np.cumsum(probs, dtype=np.float64)
        index = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(index, len(ids) - 1)])


def apply_repetition_penalty(logits: np.ndarray, previous: Iterable[int] | np.ndarray, penalty: float) -> np.ndarray:
    """A copy of ``logits`` with each distinct token in ``previous`` penalized once.

    The CTRL paper's rule as Hugging Face and llama.cpp apply it: a positive logit is divided by
    ``penalty``, a negative one multiplied, so ``penalty > 1`` always makes the token less likely.
    """
    seen = np.unique(np.fromiter(previous, dtype=np.int64) if not isinstance(previous, np.ndarray) else previous)
    seen = seen[(seen >= 0) & (seen < logits.shape[-1])]
    out = np.array(logits, dtype=np.float32, copy=True)
    if seen.size:
        values = out[seen]
        out[seen] = np.where(values > 0, values / np.float32(penalty), values * np.float32(penalty))
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()


def candidates(scaled: np.ndarray, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The token ids that survive top-k, top-p and min-p, and their (temperature-scaled) logits.

    Ids come back most likely first when top-k or top-p did any work, in vocabulary order otherwise.
    At least one token (the most likely) always survives.
    """
    vocab = scaled.shape[-1]
    ids = np.arange(vocab)
    values = scaled
    if 0 < top_k < vocab:
        ids = np.argpartition(-values, top_k - 1)[:top_k]
        values = values[ids]
    if top_p < 1.0:
        ids, values = _top_p(ids, values, top_p)
    if min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
        keep = values >= values.max() + np.float32(np.log(min_p))
        ids, values = ids[keep], values[keep]
    return ids, values


def _top_p(ids: np.ndarray, values: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Most likely first, cut after the cumulative probability reaches ``top_p``."""
    probs = softmax(values.astype(np.float64))
    order = None
    for look in _TOP_P_LOOKS:  # the nucleus is usually small: partition, and sort only the head
        if look >= probs.size:
            break
        head = np.argpartition(-probs, look - 1)[:look]
        if probs[head].sum() >= top_p:
            order = head[np.argsort(-probs[head], kind="stable")]
            break
    if order is None:
        order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    before = np.cumsum(sorted_probs) - sorted_probs  # probability mass of the more likely tokens
    keep = int(np.count_nonzero(before < top_p)) or 1
    order = order[:keep]
    return ids[order], values[order]
