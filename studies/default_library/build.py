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
import time

import numpy as np
from common import (
    HERE,
    RECIPES,
    SOURCES,
    TEST_ROWS,
    commit,
    console,
    constant_score,
    done_rows,
    publish_source,
)

from library import Library, save_prompt
from spot import backbones
from spot.evaluation import evaluate
from spot.publish import ensure_protocol
from spot.task_embedding import embed_task, key_metadata
from spot.tasks import get_task
from spot.train import TrainConfig, train


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
        resumed = (out / "state.safetensors").is_file()  # then only this part is timed
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
               "test_rows": min(TEST_ROWS, len(task.load("test"))),
               "constant_test": constant_score(name), "train_seconds": train_s,
               "resumed": resumed, "keys": ids}
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
