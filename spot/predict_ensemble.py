"""Prompt ensembles over `spot.predict.Predictor`: combining N prompts' scores (majority vote,
mean log-likelihood) and the single-prompt vs ensemble report on a task split."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from spot.predict import Predictor

def combine(scores: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
    """[n_prompts, n_choices] -> (majority index, mean-log-likelihood index, votes, mean scores).

    Vote ties go to the tied choice with the highest mean log-likelihood, then the lowest index.
    """
    scores = np.asarray(scores, np.float64)
    votes = np.bincount(scores.argmax(axis=1), minlength=scores.shape[1])
    mean = scores.mean(axis=0)
    tied = np.flatnonzero(votes == votes.max())
    vote = int(tied[np.argmax(mean[tied])])
    return vote, int(np.argmax(mean)), votes, mean


@dataclasses.dataclass(frozen=True)
class EnsembleReport:
    """Single-prompt vs best vs ensemble scores on one split (Lester et al. 2021, Table 3 shape)."""

    task: str
    split: str
    metric: str
    n_examples: int
    single: tuple[float, ...]  # each prompt alone
    vote: float  # majority vote of all prompts
    mean_logprob: float  # argmax of the mean log-likelihood

    @property
    def best(self) -> float:
        return max(self.single)

    @property
    def average(self) -> float:
        return float(np.mean(self.single))

    @property
    def std(self) -> float:
        return float(np.std(self.single))

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "best": self.best,
            "average": self.average,
            "std": self.std,
        }

    def render(self) -> str:
        lines = [
            f"{self.task} / {self.split} ({self.n_examples} examples, {self.metric}, "
            f"{len(self.single)} prompts)",
            *(f"  prompt {i}: {s:6.2f}" for i, s in enumerate(self.single)),
            f"  average:  {self.average:6.2f} ± {self.std:.2f}",
            f"  best:     {self.best:6.2f}",
            f"  ensemble (majority vote):  {self.vote:6.2f}",
            f"  ensemble (mean log-prob):  {self.mean_logprob:6.2f}",
        ]
        return "\n".join(lines)


def ensemble_report(
    predictor: Predictor,
    task: Any,
    prompts: Sequence[Any],
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
) -> EnsembleReport:
    """Score each prompt alone, their majority vote and their mean log-likelihood on `split`.

    One pass: the ensemble's rows hold every (example, prompt) pair, and the single-prompt
    scores are read off the same log-likelihoods.
    """
    from spot.tasks.splits import subset

    examples = subset(task.load(split), limit, seed)
    scores = predictor.ensemble_scores(examples, prompts)  # [n, N, c]
    labels = np.asarray([e.label for e in examples])
    metric = task.metrics[0]
    single = tuple(
        task.evaluate(scores[:, j].argmax(axis=1), labels)[metric] for j in range(scores.shape[1])
    )
    combined = [combine(s) for s in scores]
    vote = task.evaluate([c[0] for c in combined], labels)[metric]
    mean = task.evaluate([c[1] for c in combined], labels)[metric]
    return EnsembleReport(task.name, split, metric, len(examples), single, vote, mean)
