"""`make demo`: SPoT on a new target task with the shipped default prompt library.

1. load SmolLM2-135M-Instruct; 2. run the transfer pipeline (`spot.transfer.run_transfer`):
embed the target as the library's keys were made, retrieve the top-k source prompts from the
default library, tune the target from their similarity-weighted average and, at the same budget,
from its own init (the baseline); 3. print the table and write the transferability figures of
the committed study.

    python -m spot.demo [--task NAME | --task FILE.jsonl --labels neg,pos --template "..."]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from library import Library
from spot import backbones
from spot.paths import REPO_ROOT
from spot.tasks import Task, get_task, task_from_file
from spot.train import TrainConfig
from spot.transfer import run_transfer

console = Console()
DEFAULT_LIBRARY = REPO_ROOT / "spot" / "default_library"
DEFAULT_TARGET = "bigbench_social_support"
STUDY = REPO_ROOT / "studies" / "smollm2"


def _target(args: argparse.Namespace) -> Task:
    if Path(args.task).suffix in (".jsonl", ".csv", ".tsv"):
        if not args.labels:
            raise SystemExit("--labels is required with a task file (e.g. --labels neg,pos)")
        return task_from_file(args.task, name=Path(args.task).stem, labels=args.labels.split(","),
                              template=args.template)
    return get_task(args.task)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TARGET)
    parser.add_argument("--labels", default="")
    parser.add_argument("--template", default="{text}\nAnswer:")
    parser.add_argument("--library", type=Path, default=DEFAULT_LIBRARY)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--key-step", type=int, default=8,
                        help="query steps for a library whose keys record no protocol")
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = backbones.load()
    console.print(f"backbone {model.name} ({model.identity}) loaded in "
                  f"{time.perf_counter() - started:.1f}s")
    target = _target(args)
    library = Library(args.library)
    console.print(f"default library {args.library}: {library.count(backbone=model.identity)} "
                  f"prompts for this backbone")
    config = TrainConfig.build(task=target.name, backbone=model.name, steps=args.steps,
                               key_step=args.key_step, eval_every=args.steps, eval_examples=64)
    out = args.out / target.name
    console.print(f"tune {target.name} from the top-{args.k} sources (weighted) and from its "
                  f"own init (baseline): lr {config.learning_rate} {config.schedule}")
    report = run_transfer(model, target, config, out, library, strategy="weighted", k=args.k,
                          test_examples=args.test_examples, show_progress=True)

    sources = Table("rank", "source task", "per-token cosine similarity")
    for rank, r in enumerate(report.retrieved, 1):
        sources.add_row(str(rank), r.task, f"{r.similarity:.4f}")
    console.print(sources)
    results = Table("target", "init", f"test {report.metric}", "relative error reduction")
    results.add_row(target.name, f"{config.init} (baseline)", f"{report.baseline_score:.2f}", "")
    results.add_row(target.name, f"SPoT weighted top-{args.k}", f"{report.score:.2f}",
                    f"{report.relative_error_reduction():+.3f}")
    console.print(results)
    n_test = min(args.test_examples, len(target.load("test")))
    console.print(f"budget: {args.steps} steps x {config.batch_size} examples per run; test "
                  f"rows: {n_test} (fixed sample); runs under {out}")
    if (STUDY / "results.jsonl").is_file():
        from spot.figures import write_figures

        figures = write_figures(STUDY, args.out / "figures")
        console.print(f"transferability figures of the committed study: {args.out / 'figures'} "
                      f"({len(figures)} PNGs)")
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
