"""The demo's comparison with the transfer grid (no model: it reads the grid's result files)."""

from __future__ import annotations

import json

from rich.console import Console

from spot.analysis import relative_error_reduction
from spot.demo import study_table


def _write(path, rows):
    for row in rows:  # the loader checks the stored relative error reduction
        row["relative_error_reduction"] = relative_error_reduction(row["baseline_score"],
                                                                   row["transfer_score"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _render(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_study_table_reads_the_targets_grid_rows(tmp_path):
    cell = dict(target="t", metric="accuracy", steps=50, similarity={"gradient/token": 0.1},
                zero_step_score=None)
    _write(tmp_path / "results.jsonl", [
        {**cell, "source": "a", "seed": 0, "baseline_score": 50.0, "transfer_score": 60.0},
        {**cell, "source": "b", "seed": 0, "baseline_score": 50.0, "transfer_score": 40.0},
        {**cell, "source": "c", "seed": 0, "baseline_score": 50.0, "transfer_score": 55.0},
        {**cell, "source": "a", "seed": 1, "baseline_score": 54.0, "transfer_score": 58.0},
        {**cell, "source": "a", "target": "other", "seed": 0, "baseline_score": 1.0,
         "transfer_score": 99.0},
    ])
    weighted = dict(target="t", k=3, by="gradient/token", sources=["a", "c", "b"],
                    similarities=[0.1, 0.1, 0.1], metric="accuracy", steps=50)
    _write(tmp_path / "weighted.jsonl", [
        {**weighted, "seed": 0, "baseline_score": 50.0, "transfer_score": 61.0},
        {**weighted, "seed": 1, "baseline_score": 54.0, "transfer_score": 63.0},
    ])
    text = _render(study_table("t", 51.0, 62.0, 3, tmp_path))
    assert "52.00 ± 2.83 (2 seeds)" in text  # baselines 50, 54
    assert "62.00 ± 1.41 (2 seeds)" in text  # weighted 61, 63
    assert "min 40.00 · median 55.00 · best 60.00 (a)" in text  # seed 0 only, target t only
    assert "51.00" in text and "62.00" in text  # this run
    assert study_table("unknown", 1.0, 2.0, 3, tmp_path) is None
    assert study_table("t", 1.0, 2.0, 3, tmp_path / "missing") is None
