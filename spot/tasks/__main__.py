"""`python -m spot.tasks [--fetch-bigbench [PYTHON]] [TASK ...]`: rows per split of each task.

With --fetch-bigbench, an archive that cannot be obtained (pip finds no such version, no
network, a pip that refuses the sdist) exits with status 3 and says why; `make data` treats
that status, and only that one, as a warning.
"""

from __future__ import annotations

import argparse
import logging
import sys

from spot.tasks import (
    SPLITS,
    MissingDataError,
    TaskError,
    ensure_bigbench_archive,
    get_task,
    list_tasks,
)

UNAVAILABLE = 3  # exit status: the archive could not be obtained


def table(names: list[str]) -> str:
    """A Markdown table: task, family, number of choices, rows per split, metrics."""
    lines = [
        "| task | family | choices | " + " | ".join(SPLITS) + " | metrics |",
        "|---|---|---:|" + "---:|" * len(SPLITS) + "---|",
    ]
    for name in names:
        task = get_task(name)
        try:
            data = task.load_all()
            counts = [str(len(data[split])) for split in SPLITS]
        except MissingDataError as error:
            counts = [f"missing ({error})"] + [""] * (len(SPLITS) - 1)
        metrics = ", ".join(task.metrics)
        lines.append(
            f"| {name} | {task.family} | {task.num_choices} | {' | '.join(counts)} | {metrics} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m spot.tasks", description=__doc__)
    parser.add_argument("tasks", nargs="*", help="task names (default: all registered)")
    parser.add_argument(
        "--fetch-bigbench",
        nargs="?",
        const=sys.executable,
        metavar="PYTHON",
        help="download the BIG-bench archive if missing, with PYTHON's pip (default: this one)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.fetch_bigbench:
        try:
            print(f"BIG-bench archive: {ensure_bigbench_archive(args.fetch_bigbench)}")
        except TaskError as error:
            print(f"BIG-bench archive unavailable: {error}", file=sys.stderr)
            sys.exit(UNAVAILABLE)
    print(table(args.tasks or list_tasks()))


if __name__ == "__main__":
    main()
