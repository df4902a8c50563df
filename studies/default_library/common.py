"""What the default library's scripts share, without JAX: paths, the source list, the finished
sources' rows with the best constant answer's score, the bar a source must pass, committing
finished files, and publishing a finished source from runs/."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from library import Library
from spot.tasks import MissingDataError, get_task
from spot.tasks.splits import subset

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCES = (
    "sst2", "sst5", "mr", "subj", "trec", "agnews", "multirc",
    "bigbench_social_support", "bigbench_epistemic_reasoning", "bigbench_presuppositions_as_nli",
    "bigbench_strategyqa", "bigbench_sports_understanding", "bigbench_winowhy",
    "bigbench_vitaminc_fact_verification", "bigbench_hyperbaton",
    "bigbench_logical_fallacy_detection", "bigbench_intent_recognition",
    # added when strategyqa's value lost to zero-shot, so that 16 can still beat it
    "bigbench_metaphor_boolean", "bigbench_navigate",
    "bigbench_formal_fallacies_syllogisms_negation",
)
RECIPES = ("gradient", "trained")
TEST_ROWS = 1000  # the test rows a source is scored on (the whole split where smaller)
console = Console()


def done_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {row["task"]: row for row in map(json.loads, path.read_text().splitlines())}


def constant_score(name: str) -> float | None:
    """The best test score of always giving the same answer, on the rows a source is scored on
    (None when the task's data is not on this machine)."""
    task = get_task(name)
    try:
        labels = np.array([e.label for e in subset(task.load("test"), TEST_ROWS)])
    except MissingDataError as error:
        console.print(f"[yellow]{name}: no best-constant score ({error})[/yellow]")
        return None
    return max(task.evaluate(np.full(len(labels), answer), labels)[task.metrics[0]]
               for answer in range(task.num_choices))


def scored_rows() -> list[dict]:
    """The finished sources' rows (sources.jsonl), each with its `constant_test` (as recorded,
    else measured now; None when neither is possible)."""
    rows = done_rows(HERE / "sources.jsonl").values()
    return [{**r, "constant_test": r["constant_test"] if "constant_test" in r
             else constant_score(r["task"])} for r in rows]


def passes(row: dict) -> bool:
    """The issue's bar: a value beating zero-shot on its own test rows is a source (it ships,
    and it is in the grid)."""
    return row["value_test"] > row["zero_shot_test"]


def passing_sources() -> list[str]:
    """The built sources that pass the bar, in SOURCES order: the shipped library, the grid's
    sources."""
    rows = done_rows(HERE / "sources.jsonl")
    return [name for name in SOURCES if name in rows and passes(rows[name])]


def beyond_prior(row: dict) -> bool | None:
    """Whether the value beats the best constant answer too, i.e. learned more than the label
    prior (shown beside every source; a source that does not is flagged, not dropped); None
    when the constant's score is unknown."""
    if row["constant_test"] is None:
        return None
    return row["value_test"] > row["constant_test"]


def test_scores(row: dict) -> str:
    """A source's test scores as one line of entry metadata."""
    constant = row["constant_test"]
    return (f"{row['metric']} on {row['test_rows']} test rows: value {row['value_test']:.2f}, "
            f"zero-shot {row['zero_shot_test']:.2f}, best constant answer "
            + ("not measured" if constant is None else f"{constant:.2f}"))


def commit(paths: list[Path], message: str) -> None:
    """Commit only these paths (other work in the tree stays uncommitted); retry on a busy index.
    Paths that match HEAD already are not a commit (a restarted run sees them all as new)."""
    rel = [str(p.relative_to(REPO)) for p in paths]
    for _ in range(30):
        add = subprocess.run(["git", "add", "-f", "--", *rel], cwd=REPO, capture_output=True)
        if add.returncode == 0 and subprocess.run(
                ["git", "diff", "--cached", "--quiet", "HEAD", "--", *rel], cwd=REPO).returncode == 0:
            return
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--only", "--", *rel], cwd=REPO,
            capture_output=True).returncode == 0
        if done:
            return
        time.sleep(10)
    console.print(f"[yellow]could not commit {rel}[/yellow]")


def with_protocols_of(source: Library, path: Path) -> Library:
    """A library at `path` holding `source`'s key protocols (their starts, the same default)."""
    library = Library(path)
    for protocol, default in source.protocols():
        library.register_protocol(protocol, source.protocol_start(protocol), default=default)
    return library


def ensure_published() -> Library:
    """published/, the library the grid reads: rebuilt from the committed runs/ files and the
    shipped library's key protocols (the ones the build made the keys with) when it is missing,
    e.g. on a fresh checkout; no model or task data is needed."""
    path = HERE / "published"
    if (path / "manifest.sqlite").is_file():
        return Library(path)
    library = with_protocols_of(Library(REPO / "spot" / "default_library", read_only=True), path)
    for name in passing_sources():
        publish_source(library, name)
    return library


def publish_source(library: Library, name: str, row: dict | None = None) -> dict[str, str]:
    """Publish a finished source's value and its key per recipe from runs/<name>/ (the library
    holds the recipes' protocols), with its test scores when its `scored_rows` row is given;
    recipe -> key id."""
    out = HERE / "runs" / name
    data = "bigbench==1.0.0 sdist (PyPI)" if name.startswith("bigbench_") else "../shared/data"
    meta = {"task": name, "rebuild": f"python studies/default_library/build.py {name}",
            "data": data}
    if row is not None:
        meta["test"] = test_scores(row)
    return {recipe: library.publish(out / f"key.{recipe}.safetensors", out / "value.safetensors",
                                    meta).key for recipe in RECIPES}
