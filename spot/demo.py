"""`make demo`: load the default backbone, zero-shot SST-2, then a short prompt-tuning run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from spot import backbones
from spot.backbones.llama import greedy_generate
from spot.evaluation import evaluate
from spot.tasks import get_task
from spot.train import TrainConfig, train

console = Console()
TEST_ROWS = 200


def main(out: Path = Path("runs/demo")) -> None:
    started = time.perf_counter()
    model = backbones.load()
    console.print(f"backbone {model.name}: {model.identity}, d_model {model.d_model} "
                  f"(loaded in {time.perf_counter() - started:.1f}s)")
    text = "The capital of France is"
    console.print(f"greedy: {text!r} -> {greedy_generate(model, text, 4)!r}")
    task = get_task("sst2")
    empty = np.zeros((0, model.d_model), np.float32)
    zero_shot = evaluate(model, empty, task, "test", limit=TEST_ROWS)["accuracy"]
    console.print(f"zero-shot SST-2 accuracy on {TEST_ROWS} test rows: {zero_shot:.1f}")
    config = TrainConfig(task="sst2", steps=60, key_step=20, eval_every=20, eval_examples=200,
                         batch_size=8, prompt_length=20)
    result = train(model, task, config, out)
    tuned = evaluate(model, result.value, task, "test", limit=TEST_ROWS)["accuracy"]
    table = Table("prompt", f"SST-2 test accuracy ({TEST_ROWS} rows)", "files")
    table.add_row("none (zero-shot)", f"{zero_shot:.1f}", "")
    table.add_row(f"tuned {config.steps} steps x {config.batch_size}, P={config.prompt_length}",
                  f"{tuned:.1f}", f"{out}/key.safetensors, {out}/value.safetensors")
    console.print(table)
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
