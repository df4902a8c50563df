"""`spot` command line: the only place that wires backbones, tasks, training and storage.

Every command checks its arguments, files and library before loading a backbone, and reports
a user error (bad input, missing file or library, unreachable service) as one line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from library.similarity import DEFAULT_METRIC
from spot.cli_common import (
    DEFAULT_TEMPLATE,
    TASK_HELP,
    Backbone,
    ConfigBackbone,
    ConfigFile,
    LabelField,
    Labels,
    LibraryDir,
    Recipes,
    Remote,
    TaskArgs,
    TaskName,
    Template,
    Token,
    _check_backbone,
    _command,
    _config_task,
    _print_json,
    _prompt_source,
    _read_prompt,
    _searchable,
    _task,
    _train_options,
    app,
    console,
)
from spot.train import TrainConfig


@_command()
def tasks() -> None:
    """List the registered tasks."""
    from spot.tasks import get_task, list_tasks

    table = Table("task", "family", "choices", "metrics")
    for name in list_tasks():
        task = get_task(name)
        table.add_row(name, task.family, str(task.num_choices), ", ".join(task.metrics))
    console.print(table)


@_command()
@_train_options
def train(
    task: Annotated[str | None, typer.Option(help=TASK_HELP)] = None,
    out: Annotated[Path, typer.Option(help="run directory (resumes if it exists)")] = Path("runs/train"),
    backbone: ConfigBackbone = None,
    config: ConfigFile = None,
    labels: Labels = None,
    template: Template = DEFAULT_TEMPLATE,
    label_field: LabelField = "label",
    train_fields: dict[str, Any] | None = None,
) -> None:
    """Prompt-tune a task; writes key (early) and value (best) prompts into OUT."""
    from spot import backbones
    from spot.train import train as run_training

    if config is None and task is None:
        raise ValueError("--task or --config is required")
    cfg, target = _config_task(
        TrainConfig.build(config, task=task, backbone=backbone, **(train_fields or {})),
        TaskArgs(labels, template, label_field))
    model = backbones.load(cfg.backbone)
    result = run_training(model, target, cfg, out)
    console.print(f"value: step {result.value_step}, validation {result.metric} "
                  f"{result.value_score:.2f} -> {out / 'value.safetensors'}")
    console.print(f"key: step {cfg.key_step} -> {out / 'key.safetensors'}")


@_command("eval")
def evaluate(
    task: TaskName,
    prompt: Annotated[Path | None, typer.Option(
        help="prompt file or PEFT adapter directory (omit for zero-shot)")] = None,
    backbone: Backbone = "smollm2-135m",
    split: Annotated[str, typer.Option(help="train | validation | test")] = "test",
    limit: Annotated[int | None, typer.Option(help="first N of a fixed sample")] = None,
    max_length: int = TrainConfig.max_length,
    labels: Labels = None,
    template: Template = DEFAULT_TEMPLATE,
    label_field: LabelField = "label",
) -> None:
    """Score a prompt (or none: zero-shot) on a task split."""
    import numpy as np

    from spot import backbones
    from spot.evaluation import evaluate as run_eval
    from spot.prompts import load_for_backbone
    from spot.tasks import SPLITS

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    target = _task(task, TaskArgs(labels, template, label_field))
    if prompt is not None:
        _read_prompt(prompt)
    model = backbones.load(backbone)
    soft = np.zeros((0, model.d_model), np.float32)
    if prompt is not None:
        soft, _ = load_for_backbone(prompt, model)
    scores = run_eval(model, soft, target, split, limit=limit, max_length=max_length,
                      show_progress=True)
    _print_json({"task": target.name, "split": split, "prompt": str(prompt), **scores})


@_command("train-source")
@_train_options
def train_source(
    task: TaskName,
    out: Annotated[Path, typer.Option(help="run directory")],
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
    backbone: ConfigBackbone = None,
    config: ConfigFile = None,
    recipe: Recipes = None,
    labels: Labels = None,
    template: Template = DEFAULT_TEMPLATE,
    label_field: LabelField = "label",
    train_fields: dict[str, Any] | None = None,
) -> None:
    """Train a source prompt and publish its value with a key per recipe, each made by the
    library's key protocol (the library's first publish for a recipe sets the default one)."""
    from spot import backbones
    from spot.publish import publish_source
    from spot.task_embedding import DEFAULT_RECIPE
    from spot.train import train as run_training

    source = _prompt_source(library, remote, token)
    cfg = TrainConfig.build(config, task=task, backbone=backbone, **(train_fields or {}))
    cfg, source_task = _config_task(cfg, TaskArgs(labels, template, label_field))
    model = backbones.load(cfg.backbone)
    run_training(model, source_task, cfg, out)
    for name in recipe or [DEFAULT_RECIPE]:
        ids = publish_source(source, model, source_task, out / "value.safetensors", name)
        console.print(f"published {source_task.name}: {name} key {ids.key}, value {ids.value}")


@_command()
def publish(
    key: Annotated[Path, typer.Option(help="key prompt file or PEFT adapter directory")],
    value: Annotated[Path | None, typer.Option(
        help="value prompt file or PEFT adapter directory (best checkpoint)")] = None,
    task: Annotated[str | None, typer.Option(help="task name if the files do not record it")] = None,
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
) -> None:
    """Publish a source's key (and value) prompt files."""
    from spot.prompts import read_prompt

    prompts = [read_prompt(path) for path in (key, value) if path is not None]
    for path, (_, meta) in zip((key, value), prompts, strict=False):
        if path.is_dir() and not meta.get("backbone"):
            raise ValueError(f"{path} records no backbone: make a prompt file with "
                             f"`spot import {path} --backbone NAME --out FILE` and publish that")
    source = _prompt_source(library, remote, token)
    ids = source.publish(*prompts, {"task": task} if task else None)
    _print_json({"key": ids.key, "value": ids.value})


def _show_matches(retrieved) -> None:
    table = Table("rank", "source task", "similarity", "key id", "value id")
    for rank, r in enumerate(retrieved, 1):
        table.add_row(str(rank), r.task, f"{r.similarity:.4f}", r.key_id, r.value_id)
    console.print(table)


Recipe = Annotated[str | None, typer.Option(
    help="key recipe to search (gradient | trained; default: the library's default protocol)")]
EvalExamples = Annotated[int | None, typer.Option(
    help="validation rows per evaluation of a training run (0: the whole split; default 400)")]


@_command()
def query(
    task: Annotated[str | None, typer.Option(
        help="embed this task as the library's keys were: " + TASK_HELP)] = None,
    prompt: Annotated[Path | None, typer.Option(
        help="or use this key file (or PEFT adapter directory) as the query")] = None,
    out: Annotated[Path, typer.Option(
        help="run directory of a query prompt (libraries whose keys record no protocol)")] = Path("runs/query"),
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
    backbone: Backbone = "smollm2-135m",
    k: int = 3,
    metric: str = DEFAULT_METRIC,
    recipe: Recipe = None,
    eval_examples: EvalExamples = None,
    labels: Labels = None,
    template: Template = DEFAULT_TEMPLATE,
    label_field: LabelField = "label",
) -> None:
    """Top-k source prompts for a target task (or a query key file).

    The task's key is made by the library's key protocol: its start prompt, recipe and settings."""
    from spot import backbones
    from spot.prompts import load_for_backbone
    from spot.transfer import retrieve, task_query

    if (task is None) == (prompt is None):
        raise ValueError("give exactly one of --task or --prompt")
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    where = str(library or remote)
    source = _prompt_source(library, remote, token, create=False)
    held = _searchable(source, where)
    if prompt is not None:
        _read_prompt(prompt)
    else:
        target = _task(task, TaskArgs(labels, template, label_field))
        legacy = TrainConfig.build(task=target.name, backbone=backbone,
                                   eval_examples=eval_examples)
    model = backbones.load(backbone)
    _check_backbone(held, model, where)
    if prompt is not None:
        soft, _ = load_for_backbone(prompt, model)
    else:
        soft = task_query(source, model, target, recipe, (legacy, out))
    _show_matches(retrieve(source, model, soft, k, metric, recipe=recipe))


@_command("tune-target")
@_train_options
def tune_target(
    task: TaskName,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/target"),
    strategy: Annotated[str, typer.Option(help="best-of-k | weighted | mixture")] = "best-of-k",
    k: int = 3,
    metric: str = DEFAULT_METRIC,
    recipe: Recipe = None,
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
    backbone: ConfigBackbone = None,
    config: Annotated[Path | None, typer.Option(
        help="JSON TrainConfig for the transfer and baseline runs; flags override it")] = None,
    baseline: Annotated[bool, typer.Option(
        help="also tune from the config's own init at the same budget; report RER")] = True,
    test_examples: Annotated[int, typer.Option(
        help="test rows scored per run (0: the whole split)")] = 500,
    labels: Labels = None,
    template: Template = DEFAULT_TEMPLATE,
    label_field: LabelField = "label",
    train_fields: dict[str, Any] | None = None,
) -> None:
    """Query the library with the target, tune it from the top-k sources and (by default) from
    its own init; print test scores and relative error reduction (`spot.transfer.run_transfer`)."""
    from spot import backbones
    from spot.transfer import STRATEGIES, run_transfer

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if k < 1 or test_examples < 0:
        raise ValueError("--k must be at least 1 and --test-examples at least 0")
    where = str(library or remote)
    source = _prompt_source(library, remote, token, create=False)
    held = _searchable(source, where)
    target = _task(task, TaskArgs(labels, template, label_field))
    cfg = TrainConfig.build(config, task=target.name, backbone=backbone, **(train_fields or {}))
    model = backbones.load(cfg.backbone)
    _check_backbone(held, model, where)
    report = run_transfer(model, target, cfg, out, source, strategy=strategy, k=k, metric=metric,
                          recipe=recipe, baseline=baseline, test_examples=test_examples,
                          show_progress=True)
    _show_matches(report.retrieved)
    table = Table("init", f"test {report.metric}", "relative error reduction")
    if report.baseline_score is not None:
        table.add_row(f"{cfg.init} (baseline)", f"{report.baseline_score:.2f}", "")
        table.add_row(strategy, f"{report.score:.2f}", f"{report.relative_error_reduction():+.3f}")
    else:
        table.add_row(strategy, f"{report.score:.2f}", "")
    console.print(table)


# The other commands register themselves on `app` and `library_app` when imported; imported in
# this order so that `spot --help` lists every command where it always was.
from spot import cli_interop, cli_library, cli_study  # noqa: E402, F401 (registers commands)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
