"""spot.analysis / spot.figures / the transferability notebook, on hand-built and example studies."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spot import analysis
from spot.analysis import StudyError, load_study, relative_error_reduction

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "notebooks" / "example_study"
NOTEBOOK = ROOT / "notebooks" / "transferability.ipynb"


def row(source, target, seed, baseline, transfer, sim_mean, sim_token=None, **extra):
    out = {"source": source, "target": target, "seed": seed, "metric": "accuracy", "steps": 30,
           "baseline_score": baseline, "transfer_score": transfer,
           "relative_error_reduction": relative_error_reduction(baseline, transfer),
           "sim_mean": sim_mean, "sim_token": sim_mean if sim_token is None else sim_token}
    out.update(extra)
    return out


def write_study(folder: Path, rows: list[dict], tasks: dict | None = None,
                similarity: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if similarity is None:
        names = sorted({r["source"] for r in rows} | {r["target"] for r in rows})
        similarity = [{"a": a, "b": b, "metric": m, "similarity": 1.0 if a == b else 0.25}
                      for m in ("mean", "token") for a in names for b in names]
    (folder / "similarity.jsonl").write_text("".join(json.dumps(s) + "\n" for s in similarity))
    if tasks is not None:
        (folder / "tasks.json").write_text(json.dumps(tasks))
    return folder


def three_source_rows():
    """Target T (baseline 60): ranked by mean A, B, C; by token C, A, B; oracle B (70).

    Target U (baseline 80): no source beats the baseline, so gain kept is 1.0 at every k.
    """
    return [
        row("A", "T", 0, 60.0, 65.0, 0.9, 0.3),
        row("B", "T", 0, 60.0, 70.0, 0.5, 0.2),
        row("C", "T", 0, 60.0, 55.0, 0.1, 0.8),
        row("A", "U", 0, 80.0, 75.0, 0.9, 0.1),
        row("B", "U", 0, 80.0, 80.0, 0.5, 0.2),
        row("C", "U", 0, 80.0, 70.0, 0.1, 0.3),
    ]


# --------------------------------------------------------------------------- RER


@pytest.mark.parametrize(("baseline", "transfer", "expected"), [
    (80.0, 90.0, 0.5),     # error 20 -> 10
    (80.0, 70.0, -0.5),    # error 20 -> 30
    (0.0, 50.0, 0.5),
    (60.0, 60.0, 0.0),
    (100.0, 100.0, 0.0),   # perfect baseline: nothing to reduce
    (100.0, 90.0, 0.0),
])
def test_relative_error_reduction(baseline, transfer, expected):
    assert relative_error_reduction(baseline, transfer) == pytest.approx(expected)


def test_analysis_and_figures_do_not_import_jax():
    code = "import sys, spot.analysis, spot.figures; assert 'jax' not in sys.modules"
    pytest.importorskip("matplotlib")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- retrieval


def test_retrieval_curve_hand_computed(tmp_path):
    study = load_study(write_study(tmp_path, three_source_rows()))
    mean = analysis.retrieval_curve(study, "mean")
    assert list(mean.ks) == [1, 2, 3]
    np.testing.assert_allclose(mean.per_target["T"], [0.5, 1.0, 1.0])  # (65-60)/(70-60)
    np.testing.assert_allclose(mean.per_target["U"], [1.0, 1.0, 1.0])  # oracle == baseline
    np.testing.assert_allclose(mean.mean, [0.75, 1.0, 1.0])
    token = analysis.retrieval_curve(study, "token")
    np.testing.assert_allclose(token.per_target["T"], [-0.5, 0.5, 1.0])  # C (55) is ranked first
    # k random of {65, 70, 55}: E[max] = 63.33 (k=1), 68.33 (k=2), 70 (k=3)
    np.testing.assert_allclose(token.random, [(1 / 3 + 1) / 2, (5 / 6 + 1) / 2, 1.0])
    table = analysis.retrieval_table(study)
    assert [(r.k, r.gain_mean, r.gain_token) for r in table] == [
        (1, pytest.approx(0.75), pytest.approx(0.25)), (2, 1.0, pytest.approx(0.75)), (3, 1.0, 1.0)]


def test_retrieval_top1_is_oracle_gives_one_and_seeds_average(tmp_path):
    rows = [row("A", "T", 0, 50.0, 80.0, 0.9), row("B", "T", 0, 50.0, 60.0, 0.1),
            # seed 1: the most similar source (B) is the worse one: (60-50)/(80-50) = 1/3
            row("A", "T", 1, 50.0, 80.0, 0.1), row("B", "T", 1, 50.0, 60.0, 0.9)]
    study = load_study(write_study(tmp_path, rows))
    curve = analysis.retrieval_curve(study, "mean")
    np.testing.assert_allclose(curve.per_target["T"], [(1.0 + 1 / 3) / 2, 1.0])
    assert math.isnan(curve.std[0])  # one target: no spread across targets


def test_expected_random_best():
    assert analysis.expected_random_best([1.0, 2.0, 3.0], 1) == pytest.approx(2.0)
    assert analysis.expected_random_best([1.0, 2.0, 3.0], 2) == pytest.approx(8 / 3)
    assert analysis.expected_random_best([1.0, 2.0, 3.0], 5) == pytest.approx(3.0)


def test_self_transfers_are_left_out_of_retrieval_and_summary(tmp_path):
    rows = [*three_source_rows(), row("T", "T", 0, 60.0, 99.0, 1.0),
            row("T", "U", 0, 80.0, 70.0, 0.2)]
    tasks = {"A": {"family": "f", "role": "source"}, "T": {"family": "f", "role": "both"}}
    study = load_study(write_study(tmp_path, rows, tasks))
    curve = analysis.retrieval_curve(study, "mean")  # U has 4 sources, T only 3 (not itself)
    np.testing.assert_allclose(curve.per_target["T"], [0.5, 1.0, 1.0, 1.0])
    summary = {r.target: r for r in analysis.summary_table(study)}
    assert summary["T"].best_source == "B"
    sources, targets, mean, _ = analysis.rer_matrix(study)  # the heatmap still shows it
    assert mean[sources.index("T"), targets.index("T")] == pytest.approx(39 / 40)


# --------------------------------------------------------------------------- aggregation


def test_aggregate_summary_and_matrices(tmp_path):
    rows = [row("A", "T", 0, 60.0, 70.0, 0.2), row("A", "T", 1, 70.0, 70.0, 0.4),
            row("B", "T", 0, 60.0, 64.0, 0.6), row("B", "T", 1, 70.0, 76.0, 0.8)]
    study = load_study(write_study(tmp_path, rows))
    pairs = {p.source: p for p in analysis.aggregate(study)}
    assert pairs["A"].n_seeds == 2
    assert pairs["A"].transfer == pytest.approx(70.0)
    assert pairs["A"].rer == pytest.approx((0.25 + 0.0) / 2)
    assert pairs["B"].transfer_std == pytest.approx(np.std([64.0, 76.0], ddof=1))
    assert pairs["B"].sim_mean == pytest.approx(0.7)
    (summary,) = analysis.summary_table(study)  # A and B tie at 70: the first source wins
    assert (summary.target, summary.best_source, summary.baseline) == ("T", "A", 65.0)
    assert summary.best_transfer == pytest.approx(70.0)
    assert summary.top_source_mean == "B"
    tasks, matrix = analysis.similarity_matrix(study, "mean")
    assert tasks == ["A", "T", "B"] and matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    text = analysis.format_table(analysis.summary_table(study))
    assert "best_source" in text and "70.000" in text


def test_summary_best_source_and_ties(tmp_path):
    rows = [row("A", "T", 0, 60.0, 70.0, 0.2), row("B", "T", 0, 60.0, 70.0, 0.6),
            row("C", "T", 0, 60.0, 75.0, 0.1)]
    study = load_study(write_study(tmp_path, rows))
    (summary,) = analysis.summary_table(study)
    assert (summary.best_source, summary.best_transfer) == ("C", 75.0)
    assert summary.rer == pytest.approx(15 / 40)
    assert math.isnan(summary.best_transfer_std)  # one seed
    assert (summary.top_source_mean, summary.top_source_token) == ("B", "B")


# --------------------------------------------------------------------------- correlation


def test_pearson_hand_computed():
    # x - 2 = (-1, 0, 1), y - 2 = (-1, 1, 0): r = 1 / sqrt(2 * 2) = 0.5; with n = 3 the t
    # statistic has 1 degree of freedom (Cauchy): p = 1 - (2/pi) atan(0.5/sqrt(0.75)) = 2/3.
    r, p, note = analysis.pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert r == pytest.approx(0.5)
    assert p == pytest.approx(2 / 3)
    assert note == ""


def test_pearson_undefined_cases_are_nan_with_a_note():
    r, p, note = analysis.pearson([0.1, 0.2, 0.3], [5.0, 5.0, 5.0])
    assert math.isnan(r) and math.isnan(p) and "constant transfer" in note
    r, p, note = analysis.pearson([0.3, 0.3], [1.0, 2.0])
    assert math.isnan(r) and "constant similarity" in note
    r, _, note = analysis.pearson([1.0], [2.0])
    assert math.isnan(r) and "1 point" in note
    r, p, note = analysis.pearson([0.0, 1.0], [2.0, 1.0])
    assert r == pytest.approx(-1.0) and p == pytest.approx(1.0) and "2 points" in note


def test_correlations_per_target_and_pooled(tmp_path):
    # RER = (t - 50) / 50 = 0.02, 0.06, 0.04 against similarity 0.1, 0.2, 0.3: r = 0.5
    rows = [row("A", "T", 0, 50.0, 51.0, 0.1), row("B", "T", 0, 50.0, 53.0, 0.2),
            row("C", "T", 0, 50.0, 52.0, 0.3),
            row("A", "U", 0, 50.0, 50.0, 0.1), row("B", "U", 0, 50.0, 50.0, 0.2),
            row("C", "U", 0, 50.0, 50.0, 0.3)]
    study = load_study(write_study(tmp_path, rows))
    found = {c.target: c for c in analysis.correlations(study, "mean")}
    assert found["T"].r == pytest.approx(0.5) and found["T"].p == pytest.approx(2 / 3)
    assert found["T"].n == 3
    assert math.isnan(found["U"].r) and "constant transfer" in found["U"].note
    pooled = found[analysis.ALL_TARGETS]
    assert pooled.n == 6
    assert pooled.r == pytest.approx(analysis.pearson([0.1, 0.2, 0.3] * 2,
                                                      [0.02, 0.06, 0.04, 0, 0, 0])[0])


# --------------------------------------------------------------------------- loader


GOOD = row("A", "T", 0, 60.0, 70.0, 0.5)


@pytest.mark.parametrize(("bad_line", "message"), [
    ({k: v for k, v in GOOD.items() if k != "transfer_score"}, "missing field(s) transfer_score"),
    ({**GOOD, "sim_mean": float("nan")}, "'sim_mean' is not finite"),
    ({**GOOD, "baseline_score": float("inf")}, "'baseline_score' is not finite"),
    ({**GOOD, "transfer_score": "70"}, "'transfer_score' must be a number"),
    ({**GOOD, "seed": True}, "'seed' must be an integer"),
    ({**GOOD, "seed": 1.0}, "'seed' must be an integer"),
    ({**GOOD, "source": ""}, "'source' must be a non-empty string"),
    ({**GOOD, "transfer_score": 120.0}, "outside the 0-100 scale"),
    ({**GOOD, "sim_token": 1.5}, "not a cosine"),
    ({**GOOD, "seed": 0}, "duplicate row"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_loader_rejects_bad_result_rows(tmp_path, bad_line, message):
    write_study(tmp_path, [GOOD, row("B", "T", 0, 60.0, 65.0, 0.1)])
    text = bad_line if isinstance(bad_line, str) else json.dumps(bad_line)
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write("\n" + text + "\n")  # the blank line is skipped but still counted
    with pytest.raises(StudyError) as error:
        load_study(tmp_path)
    assert "results.jsonl line 4" in str(error.value)
    assert message in str(error.value)


def test_loader_rejects_bad_similarity_files(tmp_path):
    write_study(tmp_path, [GOOD])
    sims = [json.loads(line) for line in (tmp_path / "similarity.jsonl").read_text().splitlines()]

    def rewrite(rows):
        (tmp_path / "similarity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    rewrite(sims[:-1])
    with pytest.raises(StudyError, match=r"similarity.jsonl: 1 of 4 ordered pairs missing for metric 'token'"):
        load_study(tmp_path)
    rewrite([*sims[:2], {**sims[2], "metric": "cosine"}, *sims[3:]])
    with pytest.raises(StudyError, match=r"similarity.jsonl line 3: metric 'cosine'"):
        load_study(tmp_path)
    rewrite([*sims, sims[0]])
    with pytest.raises(StudyError, match=r"line 9: duplicate pair .* \(first on line 1\)"):
        load_study(tmp_path)
    rewrite([{**sims[0], "similarity": None}, *sims[1:]])
    with pytest.raises(StudyError, match=r"similarity.jsonl line 1: field 'similarity' must be a number"):
        load_study(tmp_path)
    (tmp_path / "similarity.jsonl").unlink()
    with pytest.raises(StudyError, match="similarity.jsonl: file not found .* unfinished"):
        load_study(tmp_path)


def test_loader_rejects_missing_folder_files_and_bad_tasks(tmp_path):
    with pytest.raises(StudyError, match="not a study folder"):
        load_study(tmp_path / "nowhere")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(StudyError, match="results.jsonl: file not found"):
        load_study(tmp_path / "empty")
    write_study(tmp_path / "roles", [GOOD], tasks={"A": {"family": "x", "role": "teacher"}})
    with pytest.raises(StudyError, match="tasks.json: role of 'A'"):
        load_study(tmp_path / "roles")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "results.jsonl").write_text("\n\n")
    with pytest.raises(StudyError, match="results.jsonl: no rows"):
        load_study(tmp_path / "blank")


def test_loader_notes_inconsistencies_without_failing(tmp_path):
    rows = [{**row("A", "T", 0, 60.0, 70.0, 0.5), "relative_error_reduction": 0.9},
            row("B", "T", 0, 61.0, 65.0, 0.1), row("A", "T", 1, 60.0, 70.0, 0.5)]
    with pytest.warns(UserWarning):
        study = load_study(write_study(tmp_path, rows))
    text = "\n".join(study.notes)
    assert "results.jsonl line 1: relative_error_reduction 0.9 differs" in text
    assert "baseline_score differs between sources" in text
    assert "incomplete grid: 1 (source, target, seed) rows missing, e.g. ('B', 'T', 1)" in text
    curve = analysis.retrieval_curve(study, "mean")  # seed 1 has only A: top-2 takes it
    assert list(curve.ks) == [1, 2]
    assert curve.per_target["T"][1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- example study


def test_example_study_is_synthetic_and_reproducible(tmp_path):
    study = load_study(EXAMPLE)
    assert study.synthetic
    assert (len(study.sources), len(study.targets), len(study.seeds)) == (4, 3, 2)
    assert study.notes == []
    assert "SYNTHETIC" in (EXAMPLE / "README.md").read_text()
    script = runpy.run_path(str(EXAMPLE / "make_example.py"), run_name="example")
    script["main"](tmp_path)
    for name in ("results.jsonl", "similarity.jsonl", "tasks.json"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name


# --------------------------------------------------------------------------- figures


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_figures_on_the_example(tmp_path):
    pytest.importorskip("matplotlib")
    from spot.figures import write_figures

    paths = write_figures(EXAMPLE, tmp_path / "figs", dpi=50)
    assert [p.name for p in paths] == [
        "similarity_mean.png", "similarity_token.png", "transfer_rer.png", "scatter_mean.png",
        "scatter_token.png", "retrieval_curve.png"]
    assert all(p.parent == tmp_path / "figs" and _is_png(p) for p in paths)


def test_write_figures_on_a_tiny_study(tmp_path):
    """One source and one target: no clustering tree, no correlation, a one-point curve."""
    pytest.importorskip("matplotlib")
    from spot.figures import cluster_order, write_figures

    study_dir = write_study(tmp_path / "tiny", [row("A", "T", 0, 60.0, 70.0, 0.5)])
    paths = write_figures(study_dir, tmp_path / "figs", dpi=40)
    assert len(paths) == 6 and all(_is_png(p) for p in paths)
    matrix = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.1], [0.0, 0.1, 1.0]])
    assert cluster_order(matrix) in ([0, 1, 2], [2, 1, 0])


# --------------------------------------------------------------------------- notebook


def test_notebook_is_saved_with_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs for cell in code)
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6


def test_notebook_executes_against_the_example(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("SPOT_STUDY", str(EXAMPLE))
    monkeypatch.setenv("SPOT_FIGURES", str(tmp_path / "figs"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is ipykernel's own spec; jupyter_client starts it with this interpreter.
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.outputs)
    assert "SYNTHETIC" in text and "best_source" in text and "gain_random" in text
    assert len(list((tmp_path / "figs").glob("*.png"))) == 6
