"""The accuracy budget: keep the most sensitive layers in float until the loss fits.

1. Quantize everything; measure the drop. Within budget: done.
2. Sensitivity: for each layer, the drop with only that layer quantized (all others float).
   Errors of many layers do not add up (argmax flips on near-ties come and go), so the
   one-at-a-time drop ranks layers more steadily than the recovery from leaving one out.
3. Keep the top-k layers in float for the smallest k that fits, found by bisection over k
   (log₂ N evaluations, each a quantize + run over the evaluation set).
4. If every layer in float still misses, report the best reached and stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgec.errors import EdgecError


class BudgetError(EdgecError):
    """No mix of float and quantized layers meets the accuracy budget."""


@dataclass
class BudgetResult:
    kept_float: list[str]  #: layers kept in float, most sensitive first
    drop: float  #: accuracy drop of the chosen mix
    drop_all_quantized: float
    sensitivity: dict[str, float]  #: layer -> drop when only it is quantized
    evaluations: int


def search(
    layers: list[str],
    evaluate: Callable[[frozenset[str]], float],
    budget: float,
    progress: Callable[[str], None] | None = None,
    rank: Callable[[frozenset[str]], float] | None = None,
) -> BudgetResult:
    """``evaluate(kept_float) -> drop``; returns the smallest most-sensitive-first set that fits.

    ``rank`` (default: ``evaluate``) measures the per-layer sensitivities. A task metric that is
    coarse (a few dozen right/wrong answers) cannot tell most single layers apart; a smooth one
    (top-1 agreement over every position, cosine) can, while the task metric still judges the budget.
    """
    rank = rank or evaluate
    say = progress or (lambda _: None)
    calls = 0

    def run(kept: frozenset[str]) -> float:
        nonlocal calls
        calls += 1
        return evaluate(kept)

    base = run(frozenset())
    if base <= budget:
        return BudgetResult([], base, base, {}, calls)
    sensitivity = {}
    everyone = frozenset(layers)
    for i, layer in enumerate(layers):
        say(f"sensitivity {i + 1}/{len(layers)}")
        calls += 1
        sensitivity[layer] = rank(everyone - {layer})
    ranked = sorted(layers, key=lambda name: -sensitivity[name])
    everything = run(frozenset(ranked))
    if everything > budget:
        raise BudgetError(
            f"accuracy budget {budget:.4%} cannot be met: with all {len(ranked)} layers in float the drop is "
            f"{everything:.4%} (all quantized: {base:.4%}); no bundle written"
        )
    lo, hi, best = 0, len(ranked), everything  # invariant: top-hi fits, top-lo does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        say(f"trying {mid} layers in float")
        d = run(frozenset(ranked[:mid]))
        if d <= budget:
            hi, best = mid, d
        else:
            lo = mid
    return BudgetResult(ranked[:hi], best, base, sensitivity, calls)
