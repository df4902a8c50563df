"""`make demo`: SPoT on a new target task with the shipped default prompt library.

1. load SmolLM2-135M-Instruct; 2. run the transfer pipeline (`spot.transfer.run_transfer`): embed
the target by the library's key protocol, retrieve the top-k source prompts, tune the target from
their similarity-weighted average and, at the same budget and seed, from its own init (the
baseline); 3. print both next to what the default library's transfer grid measured for this
target over three seeds (`studies/default_library/grid`), so one run is read against the spread.

    python -m spot.demo [--task NAME | --task FILE.jsonl --labels neg,pos --template "..."]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from library import Library
from spot import backbones
from spot.analysis import load_study, mean_std
from spot.paths import REPO_ROOT
from spot.tasks import Task, get_task, task_from_file
from spot.train import TrainConfig
from spot.transfer import run_transfer

console = Console()
DEFAULT_LIBRARY = REPO_ROOT / "spot" / "default_library"
STUDY = REPO_ROOT / "studies" / "default_library"
GRID = STUDY / "grid"
DEFAULT_TARGET = "mpqa"  # a grid target, not a source; its data is in ../shared/data


def _target(args: argparse.Namespace) -> Task:
    if Path(args.task).suffix in (".jsonl", ".csv", ".tsv"):
        if not args.labels:
            raise SystemExit("--labels is required with a task file (e.g. --labels neg,pos)")
        return task_from_file(args.task, name=Path(args.task).stem, labels=args.labels.split(","),
                              template=args.template)
    return get_task(args.task)


def _spread(scores: list[float]) -> str:
    """mean ± sd (seeds), or "–" for none."""
    if not scores:
        return "–"
    mean, std = mean_std(scores)
    seeds = f"({len(scores)} seed{'s' if len(scores) > 1 else ''})"
    return f"{mean:.2f} {seeds}" if len(scores) == 1 else f"{mean:.2f} ± {std:.2f} {seeds}"


def study_table(
    target: str, baseline: float, transfer: float, k: int, grid: Path = GRID,
) -> Table | None:
    """This run beside the grid's numbers for `target` (None: the grid has not run it)."""
    if not (grid / "results.jsonl").is_file():
        return None
    with warnings.catch_warnings():  # a grid in progress: its notes belong to the study README
        warnings.simplefilter("ignore")
        study = load_study(grid)
    cells = [r for r in study.rows if r.target == target]
    if not cells:
        return None
    seed0 = [r for r in cells if r.seed == 0]
    baselines = {r.seed: r.baseline_score for r in cells}
    table = Table("", "this run (seed 0)", "transfer grid, studies/default_library/grid")
    table.add_row("baseline (own init)", f"{baseline:.2f}", _spread(list(baselines.values())))
    table.add_row(f"SPoT weighted top-{k}", f"{transfer:.2f}",
                  _spread([w.transfer_score for w in study.weighted if w.target == target]))
    scores = sorted(r.transfer_score for r in seed0)
    best = max(seed0, key=lambda r: r.transfer_score)
    table.add_row(f"each of {len(seed0)} sources, tuned (seed 0)", "",
                  f"min {scores[0]:.2f} · median {statistics.median(scores):.2f} · best "
                  f"{scores[-1]:.2f} ({best.source})")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TARGET)
    parser.add_argument("--labels", default="")
    parser.add_argument("--template", default="{text}\nAnswer:")
    parser.add_argument("--library", type=Path, default=DEFAULT_LIBRARY)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--test-examples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = backbones.load()
    console.print(f"backbone {model.name} ({model.identity}) loaded in "
                  f"{time.perf_counter() - started:.1f}s")
    target = _target(args)
    library = Library(args.library)
    console.print(f"library {args.library}: {library.count(backbone=model.identity, role='value')}"
                  f" source prompts for this backbone")
    # the grid's target budget, so this run reads against the grid's numbers
    config = TrainConfig.build(STUDY / "target.json", task=target.name, backbone=model.name)
    chosen = GRID / "targets" / target.name / "init.json"  # the grid's baseline init
    if chosen.is_file():
        config = dataclasses.replace(config, init=json.loads(chosen.read_text())["init"])
    out = args.out / target.name
    console.print(f"tune {target.name} from the top-{args.k} sources (weighted) and from its own "
                  f"init (baseline): {config.steps} steps x {config.batch_size}, lr "
                  f"{config.learning_rate} {config.schedule}")
    report = run_transfer(model, target, config, out, library, strategy="weighted", k=args.k,
                          test_examples=args.test_examples, show_progress=True)

    protocol = library.resolve_protocol(model.identity)
    sources = Table("rank", "source task", f"similarity ({protocol.recipe} key, token)")
    for rank, r in enumerate(report.retrieved, 1):
        sources.add_row(str(rank), r.task, f"{r.similarity:.4f}")
    console.print(sources)
    results = Table("init", f"test {report.metric}", "relative error reduction",
                    title=target.name)
    results.add_row(f"{config.init} (baseline)", f"{report.baseline_score:.2f}", "")
    results.add_row(f"SPoT weighted top-{args.k}", f"{report.score:.2f}",
                    f"{report.relative_error_reduction():+.3f}")
    console.print(results)
    n_test = min(args.test_examples, len(target.load("test")))
    console.print(f"test rows: {n_test} (fixed sample); runs under {out}")
    grid = study_table(target.name, report.baseline_score, report.score, args.k)
    if grid is None:
        console.print(f"the transfer grid has no results for {target.name} yet")
    else:
        console.print(grid)
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
