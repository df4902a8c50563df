"""Writes the SYNTHETIC example study in this folder (deterministic; numpy only).

    python notebooks/example_study/make_example.py [OUT_DIR]

Not a result of any training: prompts are random vectors around per-family centres, and the
transfer scores are made to grow with similarity plus noise. It exists so that the analysis
code, its tests and the notebook have a small study folder in the `spot study` format until a
real study (e.g. studies/smollm2/) is there. Every row and task carries "synthetic": true.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SOURCES = {"syn_nli_a": "nli", "syn_nli_b": "nli", "syn_sentiment": "sentiment", "syn_qa": "qa"}
TARGETS = {"syn_nli_target": "nli", "syn_sentiment_target": "sentiment",
           "syn_paraphrase_target": "paraphrase"}
SEEDS = (0, 1)
LENGTH, WIDTH = 5, 16  # prompt tokens x embedding width of the made-up prompts


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def similarity(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """Same definitions as library.similarity: cosine of mean tokens, or mean token cosine."""
    if metric == "mean":
        return float(unit(a.mean(0)) @ unit(b.mean(0)))
    return float(unit(a).mean(0) @ unit(b).mean(0))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main(out: Path) -> None:
    rng = np.random.default_rng(20240601)
    families = sorted(set(SOURCES.values()) | set(TARGETS.values()))
    centre = {f: rng.normal(size=WIDTH) for f in families}
    tasks = {**SOURCES, **TARGETS}
    vector = {t: centre[f] + 0.9 * rng.normal(size=WIDTH) for t, f in tasks.items()}
    keys = {t: vector[t] + 0.6 * rng.normal(size=(LENGTH, WIDTH)) for t in tasks}
    rows = []
    for target in TARGETS:
        base_level = rng.uniform(55.0, 75.0)
        for seed in SEEDS:
            query = vector[target] + 0.6 * rng.normal(size=(LENGTH, WIDTH))
            baseline = round(base_level + rng.normal(scale=2.0), 1)
            for source in SOURCES:
                sim_mean = similarity(keys[source], query, "mean")
                sim_token = similarity(keys[source], query, "token")
                score = baseline + 14.0 * (sim_mean - 0.2) + rng.normal(scale=2.5)
                score = round(float(np.clip(score, 0.0, 100.0)), 1)
                rer = ((100.0 - baseline) - (100.0 - score)) / (100.0 - baseline)
                rows.append({"source": source, "target": target, "seed": seed,
                             "metric": "accuracy", "steps": 30, "baseline_score": baseline,
                             "transfer_score": score, "relative_error_reduction": round(rer, 6),
                             "sim_mean": round(sim_mean, 6), "sim_token": round(sim_token, 6),
                             "synthetic": True})
    write_jsonl(out / "results.jsonl", rows)
    sims = [{"a": a, "b": b, "metric": metric,
             "similarity": round(similarity(keys[a], keys[b], metric), 6), "synthetic": True}
            for metric in ("mean", "token") for a in tasks for b in tasks]
    write_jsonl(out / "similarity.jsonl", sims)
    meta = {t: {"family": f, "role": "source" if t in SOURCES else "target", "synthetic": True}
            for t, f in tasks.items()}
    (out / "tasks.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
