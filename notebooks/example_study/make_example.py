"""Writes the SYNTHETIC example study in this folder (deterministic; numpy only).

    python notebooks/example_study/make_example.py [OUT_DIR]

Not a result of any training: prompts are random vectors around per-family centres, and the
transfer scores are made to grow with the (hidden) task relatedness plus noise. It exists so that
the analysis code, its tests and the notebook have a small study folder in the `spot study`
format of a study over a library: similarity names "<recipe>/<metric>", zero-step scores, the
full grid at seed 0, seeds 1 and 2 for each target's top-3 picks only, and SPoT's weighted top-3
init at every seed. Every row and task carries "synthetic": true.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SOURCES = {"syn_nli_a": "nli", "syn_nli_b": "nli", "syn_sentiment": "sentiment", "syn_qa": "qa",
           "syn_topic": "topic"}
TARGETS = {"syn_nli_target": "nli", "syn_sentiment_target": "sentiment",
           "syn_paraphrase_target": "paraphrase"}
GRID_SEEDS, PICK_SEEDS, K = (0,), (1, 2), 3
PICK_BY = "gradient/token"
# recipe -> (key noise, metrics): the gradient keys track the tasks, the trained ones barely do
RECIPES = {"gradient": (0.6, ("mean", "token")), "trained": (8.0, ("delta-flat",))}
LENGTH, WIDTH = 5, 16  # prompt tokens x embedding width of the made-up prompts


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def similarity(a: np.ndarray, b: np.ndarray, metric: str, start: np.ndarray) -> float:
    """As library.similarity: cosine of mean tokens, mean token cosine, or the flat cosine of
    the displacement from the shared start."""
    if metric == "mean":
        return float(unit(a.mean(0)) @ unit(b.mean(0)))
    if metric == "token":
        return float(unit(a).mean(0) @ unit(b).mean(0))
    return float(unit((a - start).ravel()) @ unit((b - start).ravel()))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def run(baseline: float, score: float) -> dict:
    rer = ((100.0 - baseline) - (100.0 - score)) / (100.0 - baseline)
    return {"metric": "accuracy", "steps": 30, "baseline_score": baseline,
            "transfer_score": score, "relative_error_reduction": round(rer, 6)}


def main(out: Path) -> None:
    rng = np.random.default_rng(20240601)
    tasks = {**SOURCES, **TARGETS}
    centre = {f: rng.normal(size=WIDTH) for f in sorted(set(tasks.values()))}
    vector = {t: centre[f] + 0.9 * rng.normal(size=WIDTH) for t, f in tasks.items()}
    starts = {r: rng.normal(size=(LENGTH, WIDTH)) for r in RECIPES}
    keys = {r: {t: starts[r] + vector[t] + noise * rng.normal(size=(LENGTH, WIDTH)) for t in tasks}
            for r, (noise, _) in RECIPES.items()}
    names = [(r, m) for r, (_, metrics) in RECIPES.items() for m in metrics]

    def sims(a: str, b: str) -> dict[str, float]:
        return {f"{r}/{m}": round(similarity(keys[r][a], keys[r][b], m, starts[r]), 6)
                for r, m in names}

    rows, weighted = [], []
    for target in TARGETS:
        base_level = rng.uniform(55.0, 75.0)
        related = {s: float(unit(vector[s]) @ unit(vector[target])) for s in SOURCES}
        pair = {s: sims(s, target) for s in SOURCES}
        zero = {s: round(float(np.clip(base_level - 15.0 + 12.0 * related[s]
                                       + rng.normal(scale=3.0), 0.0, 100.0)), 1) for s in SOURCES}
        picks = sorted(SOURCES, key=lambda s: -pair[s][PICK_BY])[:K]
        for seed in (*GRID_SEEDS, *PICK_SEEDS):
            baseline = round(base_level + rng.normal(scale=2.0), 1)
            for source in SOURCES if seed in GRID_SEEDS else picks:
                score = baseline + 14.0 * (related[source] - 0.2) + rng.normal(scale=2.5)
                score = round(float(np.clip(score, 0.0, 100.0)), 1)
                rows.append({"source": source, "target": target, "seed": seed,
                             **run(baseline, score), "zero_step_score": zero[source],
                             "similarity": pair[source], "synthetic": True})
            score = baseline + 12.0 * (np.mean([related[s] for s in picks]) - 0.1)
            score = round(float(np.clip(score + rng.normal(scale=2.0), 0.0, 100.0)), 1)
            weighted.append({"target": target, "seed": seed, "k": K, "by": PICK_BY,
                             "sources": picks, "similarities": [pair[s][PICK_BY] for s in picks],
                             **run(baseline, score), "synthetic": True})
    write_jsonl(out / "results.jsonl", rows)
    write_jsonl(out / "weighted.jsonl", weighted)
    write_jsonl(out / "similarity.jsonl", [
        {"a": a, "b": b, "metric": f"{r}/{m}",
         "similarity": round(similarity(keys[r][a], keys[r][b], m, starts[r]), 6),
         "synthetic": True} for r, m in names for a in tasks for b in tasks])
    meta = {t: {"family": f, "role": "source" if t in SOURCES else "target", "synthetic": True}
            for t, f in tasks.items()}
    (out / "tasks.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    config = {"sources": list(SOURCES), "targets": list(TARGETS), "seeds": list(GRID_SEEDS),
              "pick_seeds": list(PICK_SEEDS), "k": K, "pick_by": PICK_BY, "synthetic": True}
    (out / "study.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
