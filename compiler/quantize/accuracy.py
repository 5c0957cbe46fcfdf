"""How much a quantized model loses: a score against the float reference, per model kind.

* class scores (``verify.class_score_outputs``): top-1 agreement with the float model;
* anything else (embeddings, maps, audio): mean cosine similarity per sample and output;
* or the user's task metric (API only): ``metric(outputs_list) -> score``, higher is better,
  evaluated on the float model and the quantized one; the drop is the difference.
"""

from __future__ import annotations

from typing import Callable, Collection

import numpy as np

Outputs = dict[str, np.ndarray]
TaskMetric = Callable[[list[Outputs]], float]


def metric_name(reference: list[Outputs], classes: Collection[str], task: TaskMetric | None) -> str:
    if task is not None:
        return getattr(task, "__name__", "task metric")
    kinds = {"top-1 agreement" if name in classes else "cosine" for name in reference[0]}
    return " and ".join(sorted(kinds))


def agreement(reference: list[Outputs], candidate: list[Outputs], classes: Collection[str]) -> float:
    """1.0 when ``candidate`` matches ``reference`` exactly; top-1 agreement or mean cosine otherwise."""
    scores = []
    for ref, out in zip(reference, candidate):
        for name, r in ref.items():
            o = out[name]
            if name in classes:
                scores.append(float((r.argmax(-1) == o.argmax(-1)).mean()))
            else:
                a, b = r.astype(np.float64).ravel(), o.astype(np.float64).ravel()
                denom = np.linalg.norm(a) * np.linalg.norm(b)
                scores.append(float(a @ b / denom) if denom else float(np.array_equal(a, b)))
    return float(np.mean(scores))


def drop(reference: list[Outputs], candidate: list[Outputs], classes: Collection[str], task: TaskMetric | None = None) -> float:
    """Accuracy lost by ``candidate`` relative to ``reference`` (0 = none; 0.01 = one point)."""
    if task is not None:
        return float(task(reference) - task(candidate))
    return 1.0 - agreement(reference, candidate, classes)
