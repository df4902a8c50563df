"""Classification metrics on a 0-100 scale, following GLUE/SuperGLUE conventions.

Predictions and labels are gold/predicted choice indices. Where a ratio has a zero
denominator the score is 0 (scikit-learn's convention): F1 of a class never predicted
and never gold, MCC when either side is constant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _arrays(
    predictions: Sequence[int], labels: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.ndim != 1 or gold.ndim != 1 or len(pred) != len(gold):
        raise ValueError(
            f"predictions and labels must be 1-D of equal length, got {pred.shape} and {gold.shape}"
        )
    if len(gold) == 0:
        raise ValueError("cannot score zero examples")
    for name, array in (("predictions", pred), ("labels", gold)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"{name} must be integer class indices, got dtype {array.dtype}"
            )
    return pred, gold


def _f1(pred: np.ndarray, gold: np.ndarray, positive: int) -> float:
    true_pos = np.sum((pred == positive) & (gold == positive))
    denominator = np.sum(pred == positive) + np.sum(gold == positive)
    return float(2 * true_pos / denominator) if denominator else 0.0


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    pred, gold = _arrays(predictions, labels)
    return 100.0 * float(np.mean(pred == gold))


def f1(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of class `positive` (MultiRC's F1a when rows are answer options)."""
    pred, gold = _arrays(predictions, labels)
    return 100.0 * _f1(pred, gold, positive)


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (CB)."""
    pred, gold = _arrays(predictions, labels)
    classes = np.union1d(pred, gold)
    return 100.0 * float(np.mean([_f1(pred, gold, int(c)) for c in classes]))


def mcc(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class form; the binary phi coefficient for two classes)."""
    pred, gold = _arrays(predictions, labels)
    classes, index = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (index[: len(gold)], index[len(gold) :]), 1.0)
    total, correct = confusion.sum(), np.trace(confusion)
    gold_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * total - gold_counts @ pred_counts
    denominator = np.sqrt(
        (total**2 - pred_counts @ pred_counts) * (total**2 - gold_counts @ gold_counts)
    )
    return 100.0 * float(numerator / denominator) if denominator else 0.0


METRICS: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "mcc": mcc,
}


def evaluate(
    names: Sequence[str], predictions: Sequence[int], labels: Sequence[int]
) -> dict[str, float]:
    """{name: score} for each metric name in METRICS."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    return {name: METRICS[name](predictions, labels) for name in names}
