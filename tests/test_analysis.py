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


def nrow(source, target, seed, baseline, transfer, sims, zero=None):
    """A results.jsonl row in the current format (similarity by name, zero-step score)."""
    return {"source": source, "target": target, "seed": seed, "metric": "accuracy", "steps": 30,
            "baseline_score": baseline, "transfer_score": transfer,
            "relative_error_reduction": relative_error_reduction(baseline, transfer),
            "zero_step_score": zero, "similarity": sims}


def wrow(target, seed, baseline, transfer, sources=("A",), by="g/token"):
    return {"target": target, "seed": seed, "k": len(sources), "by": by, "sources": list(sources),
            "similarities": [0.5] * len(sources), "metric": "accuracy", "steps": 30,
            "baseline_score": baseline, "transfer_score": transfer,
            "relative_error_reduction": relative_error_reduction(baseline, transfer)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_study(folder: Path, rows: list[dict], tasks: dict | None = None,
                similarity: list[dict] | None = None, weighted: list[dict] | None = None,
                config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "results.jsonl", rows)
    if similarity is None:
        names = sorted({r["source"] for r in rows} | {r["target"] for r in rows})
        metrics = list(rows[0].get("similarity", {"mean": 0, "token": 0}))
        similarity = [{"a": a, "b": b, "metric": m, "similarity": 1.0 if a == b else 0.25}
                      for m in metrics for a in names for b in names]
    write_jsonl(folder / "similarity.jsonl", similarity)
    if weighted is not None:
        write_jsonl(folder / "weighted.jsonl", weighted)
    if tasks is not None:
        (folder / "tasks.json").write_text(json.dumps(tasks))
    if config is not None:
        (folder / "study.json").write_text(json.dumps(config))
    return folder


def three_source_rows():
    """Target T (baseline 60): ranked by mean A, B, C; by token C, A, B; oracle B (70).

    Target U (baseline 80): no source beats the baseline, so gain kept is undefined there.
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
    assert list(mean.per_target) == ["T"]  # U: oracle == baseline, no gain to keep
    np.testing.assert_allclose(mean.mean, [0.5, 1.0, 1.0])
    token = analysis.retrieval_curve(study, "token")
    np.testing.assert_allclose(token.per_target["T"], [-0.5, 0.5, 1.0])  # C (55) is ranked first
    # k random of {65, 70, 55}: E[max] = 63.33 (k=1), 68.33 (k=2), 70 (k=3)
    np.testing.assert_allclose(token.random, [1 / 3, 5 / 6, 1.0])
    table = analysis.retrieval_table(study)
    assert [(r["k"], r["mean"], r["token"]) for r in table] == [
        (1, 0.5, -0.5), (2, 1.0, 0.5), (3, 1.0, 1.0)]
    assert math.isnan(analysis.gain_kept(80.0, 80.0, 80.0))


def test_seeds_without_a_gain_to_keep_are_left_out(tmp_path):
    """Seed 1 of T: no source beats its baseline, so T's gain is seed 0's alone; U has no such
    seed at all and leaves every gain statistic (not the correlations)."""
    rq = pytest.importorskip("spot.retrieval_quality")
    rows = [nrow("A", "T", 0, 50.0, 60.0, {"m": 0.9}), nrow("B", "T", 0, 50.0, 70.0, {"m": 0.1}),
            nrow("A", "T", 1, 80.0, 60.0, {"m": 0.9}), nrow("B", "T", 1, 80.0, 70.0, {"m": 0.1}),
            nrow("A", "U", 0, 90.0, 60.0, {"m": 0.9}), nrow("B", "U", 0, 90.0, 70.0, {"m": 0.1})]
    study = load_study(write_study(tmp_path, rows))
    (grid_t, grid_u) = analysis.target_grids(study)
    assert grid_t.room.tolist() == [True, False] and not grid_u.room.any()
    assert analysis.with_room([grid_t, grid_u]) == [grid_t]
    curve = analysis.retrieval_curve(study, "m")
    assert list(curve.per_target) == ["T"]
    np.testing.assert_allclose(curve.mean, [0.5, 1.0])  # (60-50)/(70-50) at seed 0
    np.testing.assert_allclose(curve.random, [0.75, 1.0])
    (quality,) = rq.retrieval_quality(study, ks=(1,), n_permutations=50)
    assert (quality.n_targets, quality.gain[1], quality.random[1]) == (2, 0.5, 0.75)
    assert quality.p_value[1] == rq.permutation_p_value(analysis.target_grids(study), "m", 1)


def test_no_gain_to_keep_anywhere(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    pytest.importorskip("matplotlib")
    from spot.analysis import NO_GAIN
    from spot.figures import retrieval_figure

    rows = [nrow("A", "T", 0, 90.0, 60.0, {"m": 0.9}), nrow("B", "T", 0, 90.0, 70.0, {"m": 0.1})]
    study = load_study(write_study(tmp_path, rows))
    with pytest.raises(ValueError, match="no source beats the baseline on any target"):
        analysis.retrieval_curve(study, "m")
    (quality,) = rq.retrieval_quality(study, ks=(1,), n_permutations=50)
    assert math.isnan(quality.gain[1]) and math.isnan(quality.p_value[1])
    texts = [t.get_text() for ax in retrieval_figure(study).axes for t in ax.texts]
    assert NO_GAIN in texts


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
            row("T", "U", 0, 80.0, 85.0, 0.2)]  # T is U's oracle: U has a gain to keep
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
    assert pairs["B"].sim("mean") == pytest.approx(0.7)
    assert pairs["B"].zero_step is None
    (summary,) = analysis.summary_table(study)  # A and B tie at 70: the first source wins
    assert (summary.target, summary.best_source, summary.baseline) == ("T", "A", 65.0)
    assert summary.best_transfer == pytest.approx(70.0)
    assert summary.top_source == "B"  # by the first name, "mean"
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
    assert summary.top_source == "B"
    (by_token,) = analysis.summary_table(study, "token")
    assert by_token.top_source == "B"
    unknown = r"unknown similarity 'flat'; this study has \['mean', 'token'\]"
    with pytest.raises(ValueError, match=unknown):
        analysis.summary_table(study, "flat")


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
    assert found["T"].rho == pytest.approx(0.5)  # ranks (1, 2, 3) vs (1, 3, 2): 1 - 6*2/(3*8)
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
    ({**GOOD, "transfer_score": 120.0}, "outside the -100-100 scale"),
    ({**GOOD, "baseline_score": -100.5}, "outside the -100-100 scale"),
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


def test_loader_takes_negative_mcc_scores(tmp_path):
    """MCC (cola) is below zero below chance; RER still counts error as 100 - score."""
    write_study(tmp_path, [row("A", "T", 0, -5.0, 10.0, 0.5),
                           row("B", "T", 0, -5.0, -20.0, 0.1)])
    study = load_study(tmp_path)
    rer = {r.source: r.relative_error_reduction for r in study.rows}
    assert rer["A"] == pytest.approx(15 / 105) and rer["B"] == pytest.approx(-15 / 105)


def test_loader_similarity_file_errors_and_gaps(tmp_path):
    write_study(tmp_path, [GOOD])
    sims = [json.loads(line) for line in (tmp_path / "similarity.jsonl").read_text().splitlines()]

    def rewrite(rows):
        (tmp_path / "similarity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    rewrite([*sims, sims[0]])
    with pytest.raises(StudyError, match=r"line 9: duplicate pair .* \(first on line 1\)"):
        load_study(tmp_path)
    rewrite([{**sims[0], "similarity": None}, *sims[1:]])
    with pytest.raises(StudyError, match=r"similarity.jsonl line 1: field 'similarity' must be a number"):
        load_study(tmp_path)
    rewrite(sims[:-1])  # a gap is noted and left blank, not fatal
    with pytest.warns(UserWarning, match="1 of 4 ordered pairs missing for metric 'token'"):
        study = load_study(tmp_path)
    tasks, matrix = analysis.similarity_matrix(study, "token")
    assert tasks == ["A", "T"] and math.isnan(matrix[1, 1]) and matrix[0, 1] == 0.25
    with pytest.raises(ValueError, match="no similarity.jsonl rows for 'flat'"):
        analysis.similarity_matrix(study, "flat")
    (tmp_path / "similarity.jsonl").unlink()  # an unfinished study: no heatmaps, still loads
    with pytest.warns(UserWarning, match="similarity.jsonl not found .* unfinished"):
        study = load_study(tmp_path)
    assert study.similarity == {} and study.similarity_names == ["mean", "token"]


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
    assert "1 (target, seed) group(s) lack some of the 2 sources" in text
    assert "e.g. ('T', 1); grid statistics use the 1 complete group(s)" in text
    curve = analysis.retrieval_curve(study, "mean")  # seed 1 (A only) is left out
    assert list(curve.ks) == [1, 2]
    np.testing.assert_allclose(curve.per_target["T"], [1.0, 1.0])


# --------------------------------------------------------------------------- study formats


def test_legacy_study_loads_with_mean_and_token(recwarn):
    study = load_study(ROOT / "studies" / "smollm2")
    assert study.similarity_names == ["mean", "token"] and study.pick_by == "mean"
    assert (len(study.sources), len(study.targets), study.seeds) == (8, 5, [0])
    assert all(r.zero_step_score is None for r in study.rows) and study.weighted == []
    first = study.rows[0]
    assert first.similarity == {"mean": pytest.approx(0.29216553),
                                "token": pytest.approx(0.02758217)}
    assert study.notes == [] and not recwarn.list
    curve = analysis.retrieval_curve(study, "mean")  # the numbers of studies/smollm2/README.md
    assert curve.mean[[0, 2]] == pytest.approx([0.51, 0.56], abs=0.005)
    assert curve.random[[0, 2]] == pytest.approx([-0.13, 0.52], abs=0.005)
    assert "sst5" not in curve.per_target  # no source beats its baseline


def test_new_format_loads_names_zero_step_weighted_and_config(tmp_path):
    sims = {"g/token": 0.5, "t/delta-flat": -0.25}
    rows = [nrow("A", "T", 0, 60.0, 70.0, sims, zero=55.0),
            nrow("B", "T", 0, 60.0, 65.0, {"t/delta-flat": 0.1, "g/token": 0.75})]
    config = {"pick_by": "t/delta-flat", "k": 1, "pick_seeds": [], "targets": ["T"]}
    study = load_study(write_study(tmp_path, rows, weighted=[wrow("T", 0, 60.0, 72.0)],
                                   config=config))
    assert study.similarity_names == ["g/token", "t/delta-flat"]  # first seen, first
    assert study.pick_by == "t/delta-flat" and study.config["k"] == 1
    assert [r.zero_step_score for r in study.rows] == [55.0, None]
    assert study.rows[1].sim("g/token") == 0.75
    assert set(study.similarity) == {"g/token", "t/delta-flat"}
    (run,) = study.weighted
    assert (run.target, run.seed, run.by, run.sources, run.transfer_score) == (
        "T", 0, "g/token", ("A",), 72.0)
    assert study.notes == []
    with pytest.raises(ValueError, match=r"unknown similarity 'mean'; this study has \['g/token'"):
        analysis.correlations(study, "mean")
    study.config["pick_by"] = "nonsense"  # falls back to the weighted runs' `by`
    assert study.pick_by == "g/token"


@pytest.mark.parametrize(("bad", "message"), [
    ({"similarity": {"g/token": 0.5}}, "similarity names ['g/token'] differ from the first row's"),
    ({"similarity": {"g/token": 0.5, "t/flat": 2.0}}, "similarity 't/flat' 2.0 is not a cosine"),
    ({"similarity": {}}, "field 'similarity' must be a non-empty object"),
    ({"zero_step_score": "high"}, "'zero_step_score' must be a number"),
    ({"zero_step_score": 101.0}, "zero_step_score 101.0 is outside the -100-100 scale"),
])
def test_new_format_rejects_bad_rows(tmp_path, bad, message):
    sims = {"g/token": 0.5, "t/flat": 0.1}
    good = nrow("A", "T", 0, 60.0, 70.0, sims)
    write_study(tmp_path, [good, {**nrow("B", "T", 0, 60.0, 65.0, sims), **bad}],
                similarity=[{"a": "A", "b": "A", "metric": "g/token", "similarity": 1.0}])
    with pytest.raises(StudyError, match="results.jsonl line 2") as error:
        load_study(tmp_path)
    assert message in str(error.value)


def test_weighted_rows_are_validated(tmp_path):
    rows = [nrow("A", "T", 0, 60.0, 70.0, {"m": 0.5})]
    write_study(tmp_path, rows, weighted=[wrow("T", 0, 60.0, 72.0), wrow("T", 0, 60.0, 71.0)])
    with pytest.raises(StudyError, match=r"weighted.jsonl line 2: duplicate row for target 'T'"):
        load_study(tmp_path)
    write_study(tmp_path, rows, weighted=[{**wrow("T", 0, 60.0, 72.0), "similarities": []}])
    with pytest.raises(StudyError, match="'sources' and 'similarities' must be lists"):
        load_study(tmp_path)


# --------------------------------------------------------------------------- retrieval quality


def ranked_study(tmp_path, targets: int, sources: int, order: str):
    """Every target: source i scores 50 + 5 i over a baseline of 50; similarity ranks the best
    source first ("right"), last ("wrong"), or right on even targets only ("mixed")."""
    rows = []
    for t in range(targets):
        for i in range(sources):
            right = order == "right" or (order == "mixed" and t % 2 == 0)
            sim = (i if right else -i) / sources
            rows.append(nrow(f"S{i}", f"T{t}", 0, 50.0, 55.0 + 5 * i, {"m": sim}))
    return load_study(write_study(tmp_path, rows))


def test_permutation_p_value(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    perfect = ranked_study(tmp_path / "perfect", 5, 6, "right")
    grids = analysis.target_grids(perfect)
    # the null reaches the observed mean gain 1.0 only when all 5 targets draw their best
    # source: (1/6)^5 = 1.3e-4, so p is about (1 + 1.3) / 10001
    assert rq.permutation_p_value(grids, "m", 1) < 0.001
    assert rq.permutation_p_value(grids, "m", 1) == rq.permutation_p_value(grids, "m", 1)
    worst = ranked_study(tmp_path / "worst", 5, 6, "wrong")  # no shuffle does worse: p = 1
    assert rq.permutation_p_value(analysis.target_grids(worst), "m", 1) == 1.0
    # 2 targets x 2 sources (gains 1 or 0.5): observed (1 + 0.5) / 2; the null mean is 0.5,
    # 0.75, 1.0 with probability 1/4, 1/2, 1/4, so p = P(null >= 0.75) = 3/4
    mixed = ranked_study(tmp_path / "mixed", 2, 2, "mixed")
    assert rq.permutation_p_value(analysis.target_grids(mixed), "m", 1) == pytest.approx(
        0.75, abs=0.02)
    right = ranked_study(tmp_path / "right", 2, 2, "right")  # P(both best) = 1/4
    assert rq.permutation_p_value(analysis.target_grids(right), "m", 1) == pytest.approx(
        0.25, abs=0.02)
    (quality,) = rq.retrieval_quality(right, ks=(1, 2), n_permutations=200)
    assert (quality.gain, quality.random[1], quality.p_value[2]) == ({1: 1.0, 2: 1.0}, 0.75, 1.0)
    assert (quality.correlation.n, quality.correlation.rho) == (2, pytest.approx(1.0))


def test_permutation_null_shuffles_each_seed_when_its_ranking_differs(tmp_path):
    """Keys measured per seed (an in-run study): seed 0 ranks B (70) first, seed 1 A (60), so
    the observed gain at 1 is (1 + 0.5) / 2. Under the null each seed draws its own order: the
    mean is 1, 0.75 or 0.5 with probability 1/4, 1/2, 1/4, so p = P(null >= 0.75) = 3/4 (one
    order shared by both seeds would give 1/2)."""
    rq = pytest.importorskip("spot.retrieval_quality")
    rows = [nrow("A", "T", s, 50.0, 60.0, {"m": sim}) for s, sim in ((0, 0.1), (1, 0.9))]
    rows += [nrow("B", "T", s, 50.0, 70.0, {"m": sim}) for s, sim in ((0, 0.9), (1, 0.1))]
    grids = analysis.target_grids(load_study(write_study(tmp_path, rows)))
    assert analysis.grid_gain(grids[0], "m", 1) == 0.75
    assert rq.permutation_p_value(grids, "m", 1, n_permutations=4000) == pytest.approx(
        0.75, abs=0.03)


def test_spearman_hand_computed():
    # ranks (1, 2, 3, 4) vs (1, 3, 2, 4): sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8; the
    # t statistic 0.8 sqrt(2 / 0.36) has 2 degrees of freedom: p = 1 - t / sqrt(t^2 + 2) = 0.2
    rho, p, note = analysis.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 30.0, 20.0, 40.0])
    assert (rho, p, note) == (pytest.approx(0.8), pytest.approx(0.2), "")
    rho, _, note = analysis.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert math.isnan(rho) and "constant transfer" in note


def test_mean_correlation_over_targets(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    # T: RER 0.02, 0.06, 0.04 vs 0.1, 0.2, 0.3 (rho 0.5, r 0.5); U: increasing (rho 1);
    # V: constant transfer, undefined, left out of the mean
    rows = [nrow(s, t, 0, 50.0, score, {"m": sim}) for t, scores in
            (("T", (51.0, 53.0, 52.0)), ("U", (51.0, 52.0, 60.0)), ("V", (50.0, 50.0, 50.0)))
            for s, score, sim in zip("ABC", scores, (0.1, 0.2, 0.3), strict=True)]
    study = load_study(write_study(tmp_path, rows))
    (quality,) = rq.retrieval_quality(study, ks=(1,), n_permutations=100)
    assert quality.n_targets == 3 and quality.correlation.n == 2
    assert quality.correlation.rho == pytest.approx((0.5 + 1.0) / 2)
    r_u = analysis.pearson([0.1, 0.2, 0.3], [0.02, 0.04, 0.2])[0]
    assert quality.correlation.r == pytest.approx((0.5 + r_u) / 2)
    # gain at 1: T picks C (52 of best 53: 2/3), U picks C (1.0), V has no gain to keep
    assert quality.gain[1] == pytest.approx((2 / 3 + 1.0) / 2)
    text = rq.retrieval_quality_markdown(study, ks=(1,), n_permutations=100)
    assert "| V | – |" in text and "| mean | 0.75 |" in text
    assert "| T | 1 | 50.00 | 51.00 to 53.00 | 1.00 | B (53.00) | 3 of 3 |" in text
    assert "| V | 1 | 50.00 | 50.00 to 50.00 | 0.00 | A (50.00) | 0 of 3 |" in text


def test_incomplete_groups_are_left_out_of_grid_statistics(tmp_path, recwarn):
    rq = pytest.importorskip("spot.retrieval_quality")
    grid = [nrow("A", "T", 0, 50.0, 60.0, {"m": 0.9}), nrow("B", "T", 0, 50.0, 70.0, {"m": 0.5}),
            nrow("C", "T", 0, 50.0, 55.0, {"m": 0.1})]
    # pick seeds: only the top-2 by m (A, B); A's seed-1 score would change every grid number
    picks = [nrow("A", "T", s, 40.0, 90.0, {"m": 0.9}) for s in (1, 2)]
    picks += [nrow("B", "T", s, 40.0, 45.0 + s, {"m": 0.5}) for s in (1, 2)]
    config = {"seeds": [0], "pick_seeds": [1, 2], "pick_by": "m"}
    study = load_study(write_study(tmp_path, grid + picks, config=config))
    assert not recwarn.list  # pick seeds are expected to be incomplete: a note, no warning
    assert "2 (target, seed) group(s) lack some of the 3 sources" in study.notes[0]
    assert list(study.complete_groups()) == [("T", 0)]
    curve = analysis.retrieval_curve(study, "m")
    np.testing.assert_allclose(curve.per_target["T"], [0.5, 1.0, 1.0])  # (60-50)/(70-50)
    (pair_a,) = [p for p in analysis.aggregate(study, complete_only=True) if p.source == "A"]
    assert (pair_a.n_seeds, pair_a.transfer) == (1, 60.0)
    assert analysis.aggregate(study)[0].n_seeds == 3  # the heatmap averages every seed
    (summary,) = analysis.summary_table(study)
    assert (summary.best_source, summary.n_seeds) == ("B", 1)
    # the picks use every seed that ran both: top-1 A (60, 90, 90), best of top-2 (70, 90, 90)
    (pick,) = rq.pick_table(study, k=2)
    assert (pick.picks, pick.n_seeds) == (("A", "B"), 3)
    assert pick.top1 == pytest.approx(80.0)
    assert pick.top1_std == pytest.approx(np.std([60, 90, 90], ddof=1))
    assert pick.best_of_k == pytest.approx(250 / 3)
    assert pick.baseline == pytest.approx(130 / 3)
    assert pick.baseline_std == pytest.approx(np.std([50, 40, 40], ddof=1))
    assert rq.pick_table(study, k=3)[0].n_seeds == 1  # C ran at seed 0 only


def test_weighted_table(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    rows = [nrow("A", t, 0, 60.0, 65.0, {"m": 0.5}) for t in ("T", "U")]
    weighted = [wrow("U", 1, 70.0, 68.0), wrow("T", 0, 60.0, 66.0), wrow("T", 1, 62.0, 70.0),
                wrow("U", 0, 72.0, 70.0)]
    study = load_study(write_study(tmp_path, rows, weighted=weighted))
    table = rq.weighted_table(study)
    assert [r.target for r in table] == ["T", "U"]
    t, u = table
    assert (t.n_seeds, t.baseline, t.weighted) == (2, 61.0, 68.0)
    assert t.baseline_std == pytest.approx(math.sqrt(2))
    assert t.weighted_std == pytest.approx(math.sqrt(8))
    assert t.rer == pytest.approx((6 / 40 + 8 / 38) / 2)
    assert (u.baseline, u.weighted, t.sources, t.by) == (71.0, 69.0, ("A",), "g/token")
    assert rq.weighted_wins(table) == 1
    assert rq.weighted_sign_test(table) == pytest.approx(0.75)  # P(at least 1 of 2 heads)
    text = rq.retrieval_quality_markdown(study, n_permutations=50)
    assert "| T | 1 | g/token | A | 2 | 61.00 ± 1.41 | 68.00 ± 2.83 | +7.00 | +0.180 |" in text
    assert "Weighted above baseline on 1 of 2 targets (one-sided sign test, ties dropped: " \
           "p 0.750)." in text


def test_weighted_sign_test_drops_ties():
    rq = pytest.importorskip("spot.retrieval_quality")

    def row(baseline: float, weighted: float):
        return rq.WeightedRow("T", 3, "g/token", ("A",), 3, baseline, 0.0, weighted, 0.0, 0.0)

    wins = [row(50.0, 60.0)] * 5
    assert rq.weighted_sign_test(wins + [row(50.0, 40.0)] * 2) == pytest.approx(29 / 128)
    assert rq.weighted_sign_test(wins + [row(50.0, 50.0)] * 2) == pytest.approx(1 / 32)
    assert math.isnan(rq.weighted_sign_test([row(50.0, 50.0)]))


def test_zero_step_correlations(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    # zero-step 40, 30, 35 against similarity 0.1, 0.2, 0.3 (rho -0.5) and RER 0.1, 0.3, 0.2
    # (ranks reversed: rho -1); D was not measured (null) and is left out of both
    rows = [nrow("A", "T", 0, 50.0, 55.0, {"m": 0.1}, zero=40.0),
            nrow("B", "T", 0, 50.0, 65.0, {"m": 0.2}, zero=30.0),
            nrow("C", "T", 0, 50.0, 60.0, {"m": 0.3}, zero=35.0),
            nrow("D", "T", 0, 50.0, 52.0, {"m": 0.4})]
    study = load_study(write_study(tmp_path, rows))
    (found,) = rq.zero_step_correlations(study, "m")
    assert (found.n, found.rho) == (3, pytest.approx(-0.5))
    assert found.r == pytest.approx(analysis.pearson([0.1, 0.2, 0.3], [40.0, 30.0, 35.0])[0])
    (tuned,) = rq.zero_step_transfer_correlations(study)
    assert (tuned.metric, tuned.n, tuned.rho) == ("zero_step", 3, pytest.approx(-1.0))
    text = rq.retrieval_quality_markdown(study, n_permutations=50)
    assert "| m | 1 | -0.50 |" in text and "| T | 3 | -1.00 |" in text


def test_partial_study_is_noted_and_analysed(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    rows = [nrow("A", "T", 0, 50.0, 60.0, {"m": 0.9}), nrow("B", "T", 0, 50.0, 70.0, {"m": 0.1}),
            nrow("A", "U", 0, 50.0, 40.0, {"m": 0.5})]  # U: B not run yet; V: nothing yet
    config = {"targets": ["T", "U", "V"], "seeds": [0]}
    with pytest.warns(UserWarning):
        study = load_study(write_study(tmp_path, rows, config=config))
    text = "\n".join(study.notes)
    assert "without a complete group, left out of grid statistics: U (1 of 2 sources)" in text
    assert "target(s) in study.json with no results yet: V" in text
    assert study.complete_targets == ["T"]
    assert [c.target for c in analysis.correlations(study, "m")] == ["T", analysis.ALL_TARGETS]
    assert list(analysis.retrieval_curve(study, "m").per_target) == ["T"]
    text = rq.retrieval_quality_markdown(study, n_permutations=50)
    assert "Grid statistics over 1 of 2 target(s)" in text
    assert "Left out (grid not complete): U. Not run yet: V." in text
    # T alone: 2 points, r = rho = -1; top-1 A keeps (60-50)/(70-50), a random one 0.75
    assert "| m | 1 | -1.00 | -1.00 | 1 | 0.50 | 0.75 | " in text


def test_study_without_any_complete_group(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    rows = [nrow("A", "T", 0, 50.0, 60.0, {"m": 0.9}), nrow("B", "U", 0, 50.0, 70.0, {"m": 0.1})]
    with pytest.warns(UserWarning):
        study = load_study(write_study(tmp_path, rows))
    assert study.complete_targets == [] and analysis.summary_table(study) == []
    with pytest.raises(ValueError, match="no complete \\(target, seed\\) group"):
        analysis.retrieval_curve(study, "m")
    text = rq.retrieval_quality_markdown(study, n_permutations=50)
    assert "Grid statistics over 0 of 2 target(s)" in text and "Left out" in text


def test_markdown_formats_numbers_and_p_values(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    text = rq.retrieval_quality_markdown(ranked_study(tmp_path, 5, 6, "right"), ks=(1, 3))
    # random@1: mean score 67.5 -> 17.5/30; random@3: E[max of 3 of 6] = 76.25 -> 26.25/30;
    # p@1 is about (1 + 10000/6^5) / 10001, p@3 about 1/2^5 (the best in 3 of 6 is 1/2)
    (line,) = [line for line in text.splitlines() if line.startswith("| m | 5 |")]
    cells = line.strip("| ").split(" | ")
    assert cells[:7] == ["m", "5", "1.00", "1.00", "5", "1.00", "0.58"]
    assert float(cells[7]) < 0.001 and cells[8:10] == ["1.00", "0.88"]
    assert float(cells[10]) == pytest.approx(1 / 32, abs=0.006)
    assert "| mean | 1.00 |" in text and "### Top picks over seeds (by m)" in text
    assert "| T0 | S5, S4, S3 | 1 | 50.00 | 80.00 | 80.00 |" in text
    assert "SYNTHETIC" not in text


def test_markdown_names_targets_where_no_source_beats_the_baseline(tmp_path):
    rq = pytest.importorskip("spot.retrieval_quality")
    rows = [nrow(s, "T0", 0, 60.0, score, {"m": sim}) for s, score, sim in
            (("A", 50.0, 0.9), ("B", 55.0, 0.1))]  # nothing beats 60: no room
    rows += [nrow(s, "T1", 0, 50.0, score, {"m": sim}) for s, score, sim in
             (("A", 70.0, 0.1), ("B", 60.0, 0.9))]  # top-1 keeps (60 - 50) / (70 - 50)
    text = rq.retrieval_quality_markdown(load_study(write_study(tmp_path / "s", rows)), ks=(1,),
                                         n_permutations=100)
    assert "No source beats the baseline on T0 (1 of 2 targets): there is no gain to keep, so " \
           "the gain columns average the other 1." in text
    (line,) = [line for line in text.splitlines() if line.startswith("| m | 2 |")]
    assert line.strip("| ").split(" | ")[5] == "0.50"  # T1 alone; T0 has no gain to keep
    per_target = text.split("Gain kept at k=1 per target")[1].split("###")[0]
    assert "| T1 | 0.50 | 0.75 |" in per_target and "| mean | 0.50 | 0.75 |" in per_target
    assert "T0" not in per_target


# --------------------------------------------------------------------------- example study


def test_example_study_is_synthetic_and_reproducible(tmp_path, recwarn):
    study = load_study(EXAMPLE)
    assert study.synthetic and not recwarn.list
    assert (len(study.sources), len(study.targets), study.seeds) == (5, 3, [0, 1, 2])
    assert study.similarity_names == ["gradient/mean", "gradient/token", "trained/delta-flat"]
    assert study.pick_by == "gradient/token" and len(study.weighted) == 9
    assert study.complete_targets == study.targets
    assert all(r.zero_step_score is not None for r in study.rows)
    assert "SYNTHETIC" in (EXAMPLE / "README.md").read_text()
    script = runpy.run_path(str(EXAMPLE / "make_example.py"), run_name="example")
    script["main"](tmp_path)
    for name in ("results.jsonl", "weighted.jsonl", "similarity.jsonl", "tasks.json", "study.json"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name


# --------------------------------------------------------------------------- figures


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_figures_on_the_example(tmp_path):
    pytest.importorskip("matplotlib")
    from spot.figures import write_figures

    paths = write_figures(load_study(EXAMPLE), tmp_path / "figs", dpi=50)
    assert [p.name for p in paths] == [
        "similarity_gradient_mean.png", "similarity_gradient_token.png",
        "similarity_trained_delta-flat.png", "transfer_rer.png", "scatter_gradient_mean.png",
        "scatter_gradient_token.png", "scatter_trained_delta-flat.png", "retrieval_curve.png",
        "retrieval_quality.png"]
    assert all(p.parent == tmp_path / "figs" and _is_png(p) for p in paths)


def test_write_figures_on_a_tiny_study(tmp_path):
    """One source and one target: no clustering tree, no correlation, a one-point curve."""
    pytest.importorskip("matplotlib")
    from spot.figures import cluster_order, write_figures

    study_dir = write_study(tmp_path / "tiny", [row("A", "T", 0, 60.0, 70.0, 0.5)])
    paths = write_figures(load_study(study_dir), tmp_path / "figs", dpi=40)
    assert len(paths) == 7 and all(_is_png(p) for p in paths)
    matrix = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.1], [0.0, 0.1, 1.0]])
    assert cluster_order(matrix) in ([0, 1, 2], [2, 1, 0])


def test_write_figures_without_complete_groups_or_similarity_file(tmp_path):
    pytest.importorskip("matplotlib")
    from spot.figures import write_figures

    rows = [nrow("A", "T", 0, 50.0, 60.0, {"g/m": 0.9}),
            nrow("B", "U", 0, 50.0, 70.0, {"g/m": 0.1})]
    study_dir = write_study(tmp_path / "partial", rows)
    (study_dir / "similarity.jsonl").unlink()
    with pytest.warns(UserWarning):
        study = load_study(study_dir)
    paths = write_figures(study, tmp_path / "figs", dpi=40)
    assert [p.name for p in paths] == ["transfer_rer.png", "scatter_g_m.png",
                                       "retrieval_curve.png", "retrieval_quality.png"]
    assert all(_is_png(p) for p in paths)


# --------------------------------------------------------------------------- notebook


def _texts(notebook) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "")
                   for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


def test_notebook_is_saved_with_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs for cell in code)
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 7
    assert "### Retrieval quality" in _texts(notebook)


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
    text = _texts(notebook)
    assert "SYNTHETIC" in text and "best_source" in text and "gain_random" in text
    assert "| gradient/token | 3 |" in text and "### SPoT weighted top-k vs baseline" in text
    assert len(list((tmp_path / "figs").glob("*.png"))) == 9
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 9
