"""`spot` command line: the only place that wires backbones, tasks, training and storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SPoT: soft prompt transfer.")
console = Console()

Backbone = Annotated[str, typer.Option(help="registered name or checkpoint directory")]


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from spot.tasks import get_task, list_tasks

    table = Table("task", "family", "choices", "metrics")
    for name in list_tasks():
        task = get_task(name)
        table.add_row(name, task.family, str(task.num_choices), ", ".join(task.metrics))
    console.print(table)


@app.command()
def train(
    task: Annotated[Optional[str], typer.Option(help="registered task name")] = None,
    out: Annotated[Path, typer.Option(help="run directory (resumes if it exists)")] = Path("runs/train"),
    backbone: Backbone = "smollm2-135m",
    config: Annotated[Optional[Path], typer.Option(help="JSON TrainConfig; flags override it")] = None,
    steps: Optional[int] = None,
    key_step: Optional[int] = None,
    eval_every: Optional[int] = None,
    eval_examples: Optional[int] = None,
    batch_size: Optional[int] = None,
    prompt_length: Optional[int] = None,
    init: Annotated[Optional[str], typer.Option(help="random_uniform|sampled_vocab|class_labels|text:..|file:..")] = None,
    optimizer: Optional[str] = None,
    learning_rate: Optional[float] = None,
    max_length: Optional[int] = None,
    seed: Optional[int] = None,
) -> None:
    """Prompt-tune a task; writes key (early) and value (best) prompts into OUT."""
    from spot import backbones
    from spot.tasks import get_task
    from spot.train import TrainConfig
    from spot.train import train as run_training

    overrides = dict(task=task, backbone=backbone, steps=steps, key_step=key_step,
                     eval_every=eval_every, eval_examples=eval_examples, batch_size=batch_size,
                     prompt_length=prompt_length, init=init, optimizer=optimizer,
                     learning_rate=learning_rate, max_length=max_length, seed=seed)
    try:
        if config is not None:
            cfg = TrainConfig.from_file(config, **overrides)
        else:
            if task is None:
                raise ValueError("--task or --config is required")
            given = {k: v for k, v in overrides.items() if v is not None}
            if steps is not None and key_step is None:
                given["key_step"] = max(1, steps // 6)
            cfg = TrainConfig(**given)
        model = backbones.load(cfg.backbone)
        result = run_training(model, get_task(cfg.task), cfg, out)
    except (ValueError, KeyError, OSError) as error:
        _fail(error)
    console.print(f"value: step {result.value_step}, validation {result.metric} "
                  f"{result.value_score:.2f} -> {out / 'value.safetensors'}")
    console.print(f"key: step {cfg.key_step} -> {out / 'key.safetensors'}")


@app.command("eval")
def evaluate(
    task: Annotated[str, typer.Option(help="registered task name")],
    prompt: Annotated[Optional[Path], typer.Option(help="prompt file (omit for zero-shot)")] = None,
    backbone: Backbone = "smollm2-135m",
    split: str = "test",
    limit: Annotated[Optional[int], typer.Option(help="first N of a fixed sample")] = None,
    max_length: int = 128,
) -> None:
    """Score a prompt (or none: zero-shot) on a task split."""
    import numpy as np

    from spot import backbones
    from spot.evaluation import evaluate as run_eval
    from spot.prompts import load_for_backbone
    from spot.tasks import get_task

    try:
        model = backbones.load(backbone)
        soft = np.zeros((0, model.d_model), np.float32)
        if prompt is not None:
            soft, _ = load_for_backbone(prompt, model)
        scores = run_eval(model, soft, get_task(task), split, limit=limit, max_length=max_length)
    except (ValueError, KeyError, OSError) as error:
        _fail(error)
    console.print(json.dumps({"task": task, "split": split, "prompt": str(prompt), **scores}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
