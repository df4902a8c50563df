"""`spot library ...`: inspect and repair a local prompt library (commands on `library_app`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from spot.cli_common import (
    DEFAULT_TEMPLATE,
    Backbone,
    ConfigBackbone,
    ConfigFile,
    CpusPerRun,
    LabelField,
    Labels,
    RayAddress,
    Recipes,
    SharedRuns,
    TaskArgs,
    Template,
    _command,
    _show,
    _task,
    _train_options,
    console,
    library_app,
)
from spot.train import TrainConfig


@_command("list", library_app)
def library_list(
    library: Annotated[Path, typer.Argument(help="library directory")],
    task: str | None = None,
    role: str | None = None,
    limit: int = 100,
) -> None:
    """List entries."""

    table = Table("id", "task", "role", "step", "score", "L", "key protocol", "backbone")
    for e in _open_library(library).list(task=task, role=role, limit=limit):
        table.add_row(e.id, e.task, e.role, _show(e.step), _show(e.score, ".2f"), str(e.length),
                      e.protocol or ("none" if e.role == "key" else ""), e.backbone)
    console.print(table)


def _open_library(path: Path):
    """An existing library (a missing one is an error, not a new empty library)."""
    from library import Library

    return Library(path, create=False)


@_command("protocols", library_app)
def library_protocols(library: Annotated[Path, typer.Argument(help="library directory")]) -> None:
    """The key protocols: how each backbone's keys are made (recipe and every setting)."""
    table = Table("id", "recipe", "default", "settings", "backbone")
    for protocol, default in _open_library(library).protocols():
        settings = {k: v for k, v in json.loads(protocol.to_json()).items()
                    if k not in ("recipe", "backbone")}
        table.add_row(protocol.id, protocol.recipe, "yes" if default else "",
                      json.dumps(settings), protocol.backbone)
    console.print(table)


@_command("rekey", library_app)
def library_rekey(
    library: Annotated[Path, typer.Argument(help="library directory")],
    recipe: Annotated[str, typer.Option(help="gradient | trained")],
    backbone: Backbone = "smollm2-135m",
) -> None:
    """Give every source a key under the library's protocol for RECIPE (values untouched;
    resumes; reports the sources whose task could not be loaded)."""
    from spot import backbones
    from spot.publish import rekey

    store = _open_library(library)
    failed = 0
    model = backbones.load(backbone)
    for row in rekey(store, model, recipe):
        if row.key is None:
            failed += 1
            console.print(f"[yellow]not rebuilt[/yellow] {row.task} (value {row.value}): "
                          f"{row.skipped}")
        else:
            state = "already keyed" if row.skipped == "done" else "keyed"
            console.print(f"{row.task}: {state} {row.key} (value {row.value})")
    if failed:
        console.print(f"{failed} source(s) could not be re-keyed")
        raise typer.Exit(1)


@_command("verify", library_app)
def library_verify(library: Annotated[Path, typer.Argument(help="library directory")]) -> None:
    """Check every file against the manifest; sweep orphans; refresh stale indexes."""

    report = _open_library(library).verify()
    console.print_json(json.dumps(report.to_dict()))
    if not report.ok:
        raise typer.Exit(1)


@_command("rebuild", library_app)
def library_rebuild(library: Annotated[Path, typer.Argument(help="library directory")]) -> None:
    """Rebuild every FAISS index from the manifest and files."""

    console.print_json(json.dumps(_open_library(library).rebuild()))


@_command("import-npy", library_app)
def library_import_npy(
    library: Annotated[Path, typer.Argument(help="library directory")],
    files: Annotated[list[Path], typer.Argument(help=".npy prompts; task = file stem")],
    backbone: Annotated[str, typer.Option(help="backbone identity to record")],
) -> None:
    """Import released `.npy` prompts (e.g. Google's) as key+value entries."""
    from library import Library, import_npy

    prompts = {path: import_npy(path) for path in files}  # every file is checked first
    store = Library(library)
    for path, prompt in prompts.items():
        ids = store.publish(prompt, prompt, {"task": path.stem, "backbone": backbone})
        console.print(f"{path.stem}: key {ids.key}, value {ids.value}")


@_command("build", library_app)
@_train_options
def library_build(
    library: Annotated[Path, typer.Argument(help="library directory (created if missing)")],
    tasks: Annotated[str, typer.Option(help="comma-separated source tasks (names or files)")],
    runs: Annotated[Path, typer.Option(help="run folder, one run per task (resumes)")] = Path(
        "runs/sources"),
    backbone: ConfigBackbone = None,
    config: ConfigFile = None,
    recipe: Recipes = None,
    labels: Labels = None,
    template: Template = DEFAULT_TEMPLATE,
    label_field: LabelField = "label",
    ray: RayAddress = None,
    cpus_per_run: CpusPerRun = 1,
    shared_runs: SharedRuns = False,
    train_fields: dict[str, Any] | None = None,
) -> None:
    """`train-source` for many tasks: train a source per task and publish its value with a key
    per recipe, each made by the library's key protocol."""
    from library import Library
    from spot import backbones
    from spot.publish import publish_source
    from spot.task_embedding import DEFAULT_RECIPE
    from spot.train import train as run_training

    args = TaskArgs(labels, template, label_field)
    given = [_task(name, args) for name in dict.fromkeys(tasks.split(","))]
    cfg = TrainConfig.build(config, task=given[0].name, backbone=backbone, **(train_fields or {}))
    store, recipes = Library(library), recipe or [DEFAULT_RECIPE]
    model = backbones.load(cfg.backbone)

    def sequential():
        for task in given:
            run_training(model, task, dataclasses.replace(cfg, task=task.name), runs / task.name)
            for name in recipes:
                value = runs / task.name / "value.safetensors"
                yield task.name, name, publish_source(store, model, task, value, name)

    if ray is None:
        built = sequential()
    else:
        from spot.ray_runner import build_library_on_ray, ray_options

        built = build_library_on_ray(cfg.backbone, model, given, cfg, store, recipes,
                                     ray_options(ray, cpus_per_run, runs, shared_runs))
    for task_name, name, ids in built:
        console.print(f"published {task_name}: {name} key {ids.key}, value {ids.value}")
