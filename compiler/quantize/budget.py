"""The accuracy budget: promote the most sensitive layers one precision step at a time until the loss fits.

Each layer has a ladder from the precision it starts at up to float, e.g. int4 -> int8-dynamic ->
float for a MatMul, int8 -> float for a Conv (``mixed.ladder``). The search:

1. Every layer at its first step; measure the drop. Within budget: done.
2. Sensitivity: for each layer, the drop with only that layer at its first step (all others
   float). Errors of many layers do not add up (argmax flips on near-ties come and go), so the
   one-at-a-time drop ranks layers more steadily than the recovery from leaving one out.
3. Promote the top-k layers one step (int4 -> int8, int8 -> float) for the smallest k that fits,
   found by bisection over k (log₂ N evaluations, each a quantize + run over the evaluation set).
   With two-step ladders only (plain int8 models) this is "keep the top-k in float". Given
   ``size(layer, precision)``, layers rank by sensitivity per byte the promotion adds, so a large
   table that is a little sensitive stays small while many small weights go up instead.
4. If even every layer one step up misses (some ladders have a middle step): rank the layers by
   their sensitivity at that middle step, bisect how many of the worst go to float with the
   rest at the middle step, then bisect how many of the least sensitive (at step 1) can go back
   down to their first step. Three tiers (e.g. float / int8 / int4), still O(N + log N) runs.
5. If every layer in float still misses, report the best reached and stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from edgec.errors import EdgecError

Assignment = dict[str, str]  #: layer -> precision


class BudgetError(EdgecError):
    """No mix of precisions meets the accuracy budget."""


@dataclass
class BudgetResult:
    precision: Assignment  #: chosen precision per searched layer
    drop: float  #: accuracy drop of the chosen mix
    drop_all_quantized: float  #: every layer at its first step
    sensitivity: dict[str, float]  #: layer -> drop when only it is at its first step
    evaluations: int
    #: layer -> drop when only it is at its middle step (measured only when step 4 ran)
    sensitivity_middle: dict[str, float] = field(default_factory=dict)

    def promoted(self, ladders: Mapping[str, Sequence[str]]) -> list[str]:
        """Layers not at their first step, most sensitive first."""
        return sorted((n for n, p in self.precision.items() if p != ladders[n][0]), key=lambda n: -self.sensitivity.get(n, 0))


def search(
    ladders: Mapping[str, Sequence[str]],
    evaluate: Callable[[Assignment], float],
    budget: float,
    progress: Callable[[str], None] | None = None,
    rank: Callable[[Assignment], float] | None = None,
    size: Callable[[str, str], float] | None = None,
) -> BudgetResult:
    """``evaluate(precision per layer) -> drop``; ``ladders[layer]`` runs from its first precision to "float".

    ``size(layer, precision)`` (bytes; default: every layer alike) weighs each promotion by what it costs.

    ``rank`` (default: ``evaluate``) measures the per-layer sensitivities. A task metric that is
    coarse (a few dozen right/wrong answers) cannot tell most single layers apart; a smooth one
    (top-1 agreement over every position, cosine) can, while the task metric still judges the budget.
    """
    rank = rank or evaluate
    say = progress or (lambda _: None)
    layers = list(ladders)
    seen: dict[tuple, float] = {}

    def run(assignment: Assignment) -> float:
        key = tuple(sorted(assignment.items()))
        if key not in seen:
            seen[key] = evaluate(assignment)
        return seen[key]

    def step(i: int) -> Assignment:
        return {n: ladders[n][min(i, len(ladders[n]) - 1)] for n in layers}

    def alone(name: str, level: int) -> float:
        return rank({n: (ladders[n][level] if n == name else "float") for n in layers})

    first, middle, floats = step(0), step(1), step(len(max(ladders.values(), key=len)))
    base = run(first)
    if base <= budget:
        return BudgetResult(first, base, base, {}, len(seen))
    sensitivity = {}
    for i, name in enumerate(layers):
        say(f"sensitivity {i + 1}/{len(layers)}")
        sensitivity[name] = alone(name, 0)
    def per_byte(name: str, level: int, drop: float) -> float:  # drop removed per byte a promotion adds
        if size is None:
            return drop
        ladder = ladders[name]
        return drop / max(size(name, ladder[min(level + 1, len(ladder) - 1)]) - size(name, ladder[level]), 1.0)

    ranked = sorted(layers, key=lambda n: -per_byte(n, 0, sensitivity[n]))
    extra = len(layers)

    def result(assignment: Assignment, middle_sensitivity: dict | None = None) -> BudgetResult:
        return BudgetResult(assignment, run(assignment), base, sensitivity, len(seen) + extra, middle_sensitivity or {})

    def promote(k: int) -> Assignment:  # the k most sensitive one step up
        return {**first, **{n: middle[n] for n in ranked[:k]}}

    if run(middle) <= budget:
        return result(promote(_smallest_fitting(lambda k: run(promote(k)) <= budget, len(ranked), say, "one step up")))
    if run(floats) > budget:
        raise BudgetError(
            f"accuracy budget {budget:.4%} cannot be met: with all {len(layers)} layers in float the drop is "
            f"{run(floats):.4%} (all quantized: {base:.4%}); no bundle written"
        )
    # Three tiers: the worst at float, the middle at their middle step, the rest back at their first.
    three = [n for n in layers if middle[n] != "float"]
    middle_sensitivity = {}
    for i, name in enumerate(three):
        say(f"sensitivity at {middle[name]} {i + 1}/{len(three)}")
        middle_sensitivity[name] = alone(name, 1)
    extra += len(three)
    worst = sorted(three, key=lambda n: -per_byte(n, 1, middle_sensitivity[n]))

    def to_float(j: int) -> Assignment:
        return {**middle, **{n: "float" for n in worst[:j]}}

    j = _smallest_fitting(lambda j: run(to_float(j)) <= budget, len(worst), say, "in float")
    chosen = to_float(j)
    back = [n for n in reversed(ranked) if chosen[n] != "float" and chosen[n] != first[n]]  # least sensitive per byte first

    def lowered(m: int) -> Assignment:
        return {**chosen, **{n: first[n] for n in back[:m]}}

    m = _largest_fitting(lambda m: run(lowered(m)) <= budget, len(back), say, "back at their first step")
    return result(lowered(m), middle_sensitivity)


def _smallest_fitting(fits: Callable[[int], bool], n: int, say, what: str) -> int:
    """Smallest k in 0..n with fits(k), given fits(n) and fits monotone in k."""
    lo, hi = -1, n  # invariant: fits(hi), not fits(lo) (lo = -1 is "nothing tried")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        say(f"trying {mid} layers {what}")
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _largest_fitting(fits: Callable[[int], bool], n: int, say, what: str) -> int:
    """Largest m in 0..n with fits(m), given fits(0)."""
    lo, hi = 0, n + 1  # invariant: fits(lo), not fits(hi) (hi = n + 1 is "past the end")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        say(f"trying {mid} layers {what}")
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
