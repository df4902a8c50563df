"""Build the default library's sources: train each value, score it and zero-shot on its test
split, make its key under each recipe's protocol, publish them, and commit each finished
source's files (runs/<task>/: config, metrics, value, keys; sources.jsonl). The library itself
(published/, not committed) is derived from those files.

    python studies/default_library/build.py [--no-commit] [TASK ...]

Resumes: a source whose row is in sources.jsonl is skipped; a run directory resumes its run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from library import Library, save_prompt
from spot import backbones
from spot.evaluation import evaluate
from spot.publish import ensure_protocol
from spot.task_embedding import embed_task, key_metadata
from spot.tasks import get_task
from spot.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCES = (
    "sst2", "sst5", "mr", "subj", "trec", "agnews", "multirc",
    "bigbench_social_support", "bigbench_epistemic_reasoning", "bigbench_presuppositions_as_nli",
    "bigbench_strategyqa", "bigbench_sports_understanding", "bigbench_winowhy",
    "bigbench_vitaminc_fact_verification", "bigbench_hyperbaton",
    "bigbench_logical_fallacy_detection", "bigbench_intent_recognition",
)
RECIPES = ("gradient", "trained")
TEST_ROWS = 1000  # test split cap (the whole split where smaller)
console = Console()


def done_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {row["task"]: row for row in map(json.loads, path.read_text().splitlines())}


def commit(paths: list[Path], message: str) -> None:
    """Commit only these paths (other work in the tree stays uncommitted); retry on a busy index."""
    rel = [str(p.relative_to(REPO)) for p in paths]
    for _ in range(30):
        add = subprocess.run(["git", "add", "-f", "--", *rel], cwd=REPO, capture_output=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--only", "--", *rel], cwd=REPO,
            capture_output=True).returncode == 0
        if done:
            return
        time.sleep(10)
    console.print(f"[yellow]could not commit {rel}[/yellow]")


def publish_source(library: Library, name: str) -> dict[str, str]:
    """Publish a finished source's value and its key per recipe from runs/<name>/ (the library
    holds the recipes' protocols); recipe -> key id."""
    out = HERE / "runs" / name
    data = "bigbench==1.0.0 sdist (PyPI)" if name.startswith("bigbench_") else "../shared/data"
    return {recipe: library.publish(out / f"key.{recipe}.safetensors", out / "value.safetensors", {
        "task": name, "rebuild": f"python studies/default_library/build.py {name}",
        "data": data}).key for recipe in RECIPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", default=list(SOURCES))
    parser.add_argument("--no-commit", action="store_true")
    args = parser.parse_args()
    model = backbones.load()
    library = Library(HERE / "published")
    rows_path = HERE / "sources.jsonl"
    base = json.loads((HERE / "source.json").read_text())
    for name in args.tasks:
        if name in done_rows(rows_path):
            continue
        task = get_task(name)
        config = TrainConfig(**{**base, "task": name})
        out = HERE / "runs" / name
        started = time.perf_counter()
        run = train(model, task, config, out)
        train_s = time.perf_counter() - started
        metric = task.metrics[0]
        empty = np.zeros((0, model.d_model), np.float32)
        zero_shot = evaluate(model, empty, task, "test", limit=TEST_ROWS)[metric]
        value = evaluate(model, run.value, task, "test", limit=TEST_ROWS)[metric]
        for recipe in RECIPES:  # keys are kept beside the run, so the library rebuilds from files
            protocol, start = ensure_protocol(library, model, recipe)
            key_file = out / f"key.{recipe}.safetensors"
            if not key_file.is_file():
                key = embed_task(model, task, protocol, start, show_progress=True)
                save_prompt(key_file, key, key_metadata(protocol, task))
        ids = publish_source(library, name)
        row = {"task": name, "metric": metric, "zero_shot_test": zero_shot, "value_test": value,
               "value_step": run.value_step, "value_validation": run.value_score,
               "steps_run": run.history[-1]["step"], "validation_rows": min(
                   config.eval_examples or 10**9, len(task.load("validation"))),
               "test_rows": min(TEST_ROWS, len(task.load("test"))), "train_seconds": train_s,
               "keys": ids}
        with rows_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        console.print(row)
        if not args.no_commit:
            commit([rows_path, *[out / f for f in ("config.json", "metrics.jsonl",
                                                     "value.safetensors")],
                    *out.glob("key.*.safetensors")],
                   f"default library: source {name} (test {metric} {value:.2f}, zero-shot "
                   f"{zero_shot:.2f}, value step {run.value_step})")


if __name__ == "__main__":
    main()
