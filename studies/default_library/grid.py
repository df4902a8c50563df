"""The default library's transfer grid: `spot study --library` over the built sources that beat
zero-shot (those ship; build.py builds them) and the 8 targets, then each target's baseline
trained long (how far the grid's budget is from it). Commits the study's result files as they
land, so an interrupted run loses at most the cells in flight. A target whose data is not on
this machine is skipped and named (the BIG-bench archive is no longer on PyPI).

    python studies/default_library/grid.py [--no-commit] [--skip-long]

Resumes: cells in grid/results.jsonl, grid/weighted.jsonl and grid/zero_step.jsonl are not run
again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, REPO, commit, console, ensure_published, passing_sources

from spot.tasks import MissingDataError, get_task

# rte first (its grid had begun), then the rest by cost, cheapest first, so a session's end cuts
# the fewest targets short; mpqa early, as `make demo`'s target
TARGETS = ("rte", "copa", "mpqa", "cb", "wsc", "cola", "bigbench_implicatures", "boolq")
GRID = HERE / "grid"
TEXT_INIT = "text:Read the text and choose the correct answer."
LONG_STEPS = 300  # the baseline "converged": the source setting (patience 3), capped here
RESULTS = ("results.jsonl", "weighted.jsonl", "zero_step.jsonl", "similarity.jsonl",
           "tasks.json", "study.json")


def available_targets() -> list[str]:
    """TARGETS whose data loads here (the others are named and skipped)."""
    found = []
    for name in TARGETS:
        try:
            get_task(name).load("test")
            found.append(name)
        except MissingDataError as error:
            console.print(f"[yellow]target {name} skipped: {error}[/yellow]")
    return found


def study_command(sources: list[str], targets: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "spot", "study", "--library", str(HERE / "published"),
        "--sources", ",".join(sources), "--targets", ",".join(targets), "--out", str(GRID),
        "--target-config", str(HERE / "target.json"), "--seeds", "0", "--pick-seeds", "1,2",
        "--k", "3", "--baseline-inits", f"class_labels|{TEXT_INIT}", "--test-examples", "300",
    ]


def result_files() -> list[Path]:
    files = [GRID / f for f in RESULTS if (GRID / f).is_file()]
    return files + sorted((GRID / "queries").glob("*/*.safetensors")) + sorted(
        (GRID / "targets").glob("*/init.json"))


def run_grid(targets: list[str], no_commit: bool) -> None:
    """Run the study over the built sources that beat zero-shot (`common.passes`) in a child
    process; commit its result files whenever they change."""
    ensure_published()
    sources = passing_sources()
    console.print(f"grid sources ({len(sources)}): {', '.join(sources)}")
    child = subprocess.Popen(study_command(sources, targets), cwd=REPO)
    seen: dict[Path, float] = {}
    while True:
        finished = child.poll() is not None
        changed = [f for f in result_files() if seen.get(f) != f.stat().st_mtime]
        if changed and not no_commit:
            rows = len((GRID / "results.jsonl").read_text().splitlines()) if (
                GRID / "results.jsonl").is_file() else 0
            commit(changed, f"default library grid: {rows} cells")
        seen.update({f: f.stat().st_mtime for f in changed})
        if finished:
            break
        time.sleep(60)
    if child.returncode:
        raise SystemExit(f"spot study failed ({child.returncode})")


def run_long_baselines(targets: list[str], no_commit: bool) -> None:
    """Each target's chosen baseline init in the source setting, up to LONG_STEPS steps."""
    from spot import backbones
    from spot.train import TrainConfig, train
    from spot.transfer import held_out_score

    path = GRID / "long_baselines.jsonl"
    done = {json.loads(line)["target"] for line in path.read_text().splitlines()} if (
        path.is_file()) else set()
    model = None
    for target in targets:
        if target in done:
            continue
        model = model or backbones.load()
        init = json.loads((GRID / "targets" / target / "init.json").read_text())["init"]
        base = json.loads((HERE / "source.json").read_text())
        config = TrainConfig(**{**base, "task": target, "init": init, "steps": LONG_STEPS})
        task = get_task(target)
        run = train(model, task, config, GRID / "long" / target)
        row = {"target": target, "init": init, "steps": LONG_STEPS, "value_step": run.value_step,
               "steps_run": run.history[-1]["step"], "validation": run.value_score,
               "test": held_out_score(model, task, run, 300)}
        with path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        console.print(row)
        if not no_commit:
            commit([path], f"default library grid: {target} baseline at up to {LONG_STEPS} "
                           f"steps (test {row['test']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-commit", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    args = parser.parse_args()
    targets = available_targets()
    run_grid(targets, args.no_commit)
    if not args.skip_long:
        run_long_baselines(targets, args.no_commit)


if __name__ == "__main__":
    main()
