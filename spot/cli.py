"""`spot` command line: the only place that wires backbones, tasks, training and storage.

Every command checks its arguments, files and library before loading a backbone, and reports
a user error (bad input, missing file or library, unreachable service) as one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import typing
from collections.abc import Callable
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spot.train import TrainConfig, TrainingError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SPoT: soft prompt transfer.")
console = Console()

# What a user can cause: bad arguments or data (ValueError: TaskError, LibraryError, ...),
# missing files, an unreachable service, a diverging run. Anything else is a bug: traceback.
USER_ERRORS = (ValueError, KeyError, OSError, httpx.HTTPError, TrainingError)
F = TypeVar("F", bound=Callable[..., Any])

Backbone = Annotated[str, typer.Option(help="registered name or checkpoint directory")]
# for commands that also read a config file: None keeps the file's backbone
ConfigBackbone = Annotated[str | None, typer.Option(
    help="registered name or checkpoint directory (default: the config file's, else smollm2-135m)")]
ConfigFile = Annotated[Path | None, typer.Option(help="JSON TrainConfig; flags override it")]
# The TrainConfig fields every training command takes as options (--task and --backbone are
# declared by each command, with their own help).
TRAIN_FIELDS = tuple(f for f in dataclasses.fields(TrainConfig) if f.name not in ("task", "backbone"))


TASK_HELP = ("registered task name; a .jsonl/.csv/.tsv file (with --labels, --template, "
             "--label-field); or a .json task spec {data, labels, template, label_field, ...}")
TaskName = Annotated[str, typer.Option(help=TASK_HELP)]
Labels = Annotated[str | None, typer.Option(
    help="a task file's label values, comma-separated, in choice order (e.g. neg,pos)")]
Template = Annotated[str, typer.Option(help="a task file's prompt: str.format over its fields")]
LabelField = Annotated[str, typer.Option(help="a task file's label column (or JSON field)")]
DEFAULT_TEMPLATE = "{text}\nAnswer:"
SPEC_KEYS = ("data", "labels", "template", "label_field", "choices", "name", "metrics")


@dataclasses.dataclass(frozen=True)
class TaskArgs:
    """How a task option is read: --labels, --template and --label-field for a data file."""

    labels: str | None = None
    template: str = DEFAULT_TEMPLATE
    label_field: str = "label"


def _task_spec(path: Path):
    """A task from a JSON spec; its data paths are relative to the spec's folder."""
    from spot.tasks import task_from_file

    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: task spec is not JSON: {error}") from None
    if not isinstance(spec, dict) or "data" not in spec or "labels" not in spec:
        raise ValueError(f"{path}: a task spec is a JSON object with at least data and labels")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown task spec keys {unknown} (known: {list(SPEC_KEYS)})")
    data = spec.pop("data")
    data = ({split: path.parent / f for split, f in data.items()} if isinstance(data, dict)
            else path.parent / data)
    return task_from_file(data, **{"name": path.stem, "template": DEFAULT_TEMPLATE, **spec})


def _task(name: str, args: TaskArgs = TaskArgs()):
    """A registered task, a task over the user's data file (named by the file's stem) or a JSON
    task spec; its data is read now, so bad rows fail before any model is loaded."""
    from spot.tasks import get_task, list_tasks, task_from_file
    from spot.tasks.user import SUFFIXES

    path = Path(name)
    suffix = path.suffix.lower()
    if suffix not in (*SUFFIXES, ".json"):
        task = get_task(name)
    else:
        if not path.is_file():
            raise ValueError(f"task file {name} not found")
        if suffix == ".json":
            task = _task_spec(path)
        elif not args.labels:
            raise ValueError(f"{name} is a task file: give its label values with --labels a,b,...")
        else:
            task = task_from_file(path, name=path.stem, labels=[v.strip() for v in args.labels.split(",")],
                                  template=args.template, label_field=args.label_field)
        if task.name in list_tasks():
            raise ValueError(f"task file {name} is named {task.name!r}, a registered task: rename "
                             "the file (or set \"name\" in a task spec)")
    task.load_all()
    return task


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _user_errors(command: F) -> F:
    """The command reports USER_ERRORS as one line and exit status 2, never a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            _fail(error)

    return run  # type: ignore[return-value]


def _command(name: str | None = None, parent: typer.Typer = app) -> Callable[[F], F]:
    """Register a command of `parent` that reports user errors without a traceback."""
    return lambda command: parent.command(name)(_user_errors(command))


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="also show data-cleaning warnings (dropped malformed rows)")] = False,
) -> None:
    """SPoT: soft prompt transfer."""
    logging.getLogger("spot.tasks").setLevel(logging.WARNING if verbose else logging.ERROR)


def _field_help(field: dataclasses.Field) -> str:
    """A TrainConfig field's help, with its default and the backbones' recommended values."""
    from spot.backbones import RECOMMENDED

    notes = [] if field.default is None else [f"default {field.default}"]
    notes += [f"{name}: {values[field.name]}" for name, values in RECOMMENDED.items()
              if field.name in values]
    return f"{field.metadata['help']} ({'; '.join(notes)})" if notes else field.metadata["help"]


def _train_options(command: F) -> F:
    """Give `command` one option per TrainConfig field in `TRAIN_FIELDS` (help from the field;
    None: not given), passed to it together as `train_fields`, for `TrainConfig.build`."""
    hints = typing.get_type_hints(TrainConfig)
    declared = signature(command, eval_str=True)
    kept = [p for p in declared.parameters.values() if p.name != "train_fields"]
    added = [Parameter(f.name, Parameter.KEYWORD_ONLY, default=None, annotation=(
        Annotated[hints[f.name] | None, typer.Option(help=_field_help(f),
                                                     rich_help_panel="Training (TrainConfig)")]))
        for f in TRAIN_FIELDS]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        fields = {f.name: kwargs.pop(f.name) for f in TRAIN_FIELDS}
        return command(*args, train_fields=fields, **kwargs)

    run.__signature__ = declared.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
    return run  # type: ignore[return-value]


def _config_task(config, args: TaskArgs):
    """(the config with its task's resolved name, the task) for a config whose task may be a file."""
    task = _task(config.task, args)
    return dataclasses.replace(config, task=task.name), task


def _read_prompt(path: Path) -> None:
    """Refuse an unreadable prompt file or PEFT directory before any backbone is loaded."""
    from spot.prompts import read_prompt

    read_prompt(path)


def _print_json(value: Any) -> None:
    """One line of JSON (not wrapped, no markup), for scripts to read."""
    console.print(json.dumps(value), soft_wrap=True, markup=False, highlight=False)


def _show(value: Any, fmt: str = "") -> str:
    """A table cell: None as an en dash."""
    return "–" if value is None else format(value, fmt)


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


library_app = typer.Typer(no_args_is_help=True, help="Inspect and repair a local prompt library.")
app.add_typer(library_app, name="library")

LibraryDir = Annotated[Path | None, typer.Option("--library", help="local library directory")]
Remote = Annotated[str | None, typer.Option(help="retrieval service URL instead of a local library")]
Token = Annotated[str | None, typer.Option(envvar="SPOT_API_TOKEN", help="bearer token for --remote")]


def _prompt_source(library: Path | None, remote: str | None, token: str | None,
                   create: bool = True):
    """A local Library or a RetrievalClient: both offer publish/query/read_bytes. `create`:
    a missing local library is made (to publish into), else it is an error."""
    if (library is None) == (remote is None):
        raise ValueError("give exactly one of --library DIR or --remote URL")
    if remote is not None:
        from retrieval_api.client import RetrievalClient

        return RetrievalClient(remote, token)
    from library import Library

    return Library(library, create=create)


def _searchable(source, where: str) -> dict[str, int]:
    """The backbones `source` holds prompts for; an empty library is an error."""
    held = source.backbones()
    if not held:
        raise ValueError(f"{where} holds no prompts to search")
    return held


def _check_backbone(held: dict[str, int], model, where: str) -> None:
    """Refuse a library without prompts for this backbone (before any query is made)."""
    if model.identity not in held:
        raise ValueError(f"{where} holds no prompts for backbone {model.name} "
                         f"({model.identity}); it holds {', '.join(held)}")


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
    recipe: Annotated[list[str] | None, typer.Option(
        help="key recipe(s) to publish, each by the library's protocol (default: gradient)")] = None,
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
    metric: str = "token",
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
    metric: str = "token",
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


@_command("export")
def export(
    prompt: Annotated[Path, typer.Argument(help="prompt file (.safetensors)")],
    out: Annotated[Path, typer.Argument(help="PEFT adapter directory, or .npy file")],
    fmt: Annotated[str, typer.Option("--format", help="peft | npy")] = "peft",
    base_model: Annotated[str | None, typer.Option(
        help="PEFT's base_model_name_or_path (e.g. HuggingFaceTB/SmolLM2-135M)")] = None,
) -> None:
    """Export a prompt file as a PEFT adapter or a .npy array.

    The adapter keeps task, step, backbone and the rest in its spot_prompt.json."""
    import numpy as np

    from library.prompt_file import export_peft, load_prompt

    if fmt not in ("peft", "npy"):
        raise ValueError(f"unknown format {fmt!r}; choose peft or npy")
    array, meta = load_prompt(prompt)
    if fmt == "npy":
        if out.suffix != ".npy":
            raise ValueError(f"{out}: an npy export is a .npy file")
        np.save(out, array, allow_pickle=False)
    else:
        export_peft(array, out, base_model=base_model, metadata=meta)
    console.print(f"{prompt} -> {out} ({fmt})")


@_command("import")
def import_prompt(
    source: Annotated[Path, typer.Argument(help="PEFT adapter directory or .npy file")],
    out: Annotated[Path, typer.Option(help="prompt file to write (.safetensors)")],
    backbone: Backbone = "smollm2-135m",
    task: Annotated[str | None, typer.Option(help="task name (default: recorded, else SOURCE's "
                                                  "name)")] = None,
) -> None:
    """Import a PEFT adapter or .npy prompt as a prompt file of a backbone.

    The file is stamped with the backbone identity, so it can be published and transferred."""
    from library import import_npy
    from spot import backbones
    from spot.prompts import read_prompt, save_for_backbone

    if source.is_dir():
        array, meta = read_prompt(source)
    else:
        array, meta = import_npy(source), {}
    model = backbones.load(backbone)
    recorded = meta.pop("backbone", None)
    if recorded and recorded != model.identity:
        raise ValueError(f"{source} was trained on backbone {recorded}, not {model.identity} "
                         f"({model.name})")
    meta["task"] = task or meta.get("task") or source.stem
    save_for_backbone(out, array, model, **meta)
    console.print(f"{source} -> {out} (backbone {model.identity}, task {meta['task']})")


StudyOption = Annotated[int | None, typer.Option(help="sets it in both configs")]
RayAddress = Annotated[str | None, typer.Option(
    help="run each training run as a Ray task: auto (start a local Ray) or a cluster's address",
    rich_help_panel="Ray")]
CpusPerRun = Annotated[int, typer.Option(
    help="CPUs per run (--ray auto: one worker per this many CPUs)", rich_help_panel="Ray")]
SharedRuns = Annotated[bool, typer.Option(
    help="with --ray ADDRESS: the run folder is on storage every worker sees at the same path "
         "(runs write and resume there; default: each worker's temp dir)", rich_help_panel="Ray")]


@_command()
def study(
    sources: Annotated[str, typer.Option(help="comma-separated source tasks (names or files)")],
    targets: Annotated[str, typer.Option(help="comma-separated target tasks (names or files)")],
    out: Annotated[Path, typer.Option(help="study folder (resumes)")] = Path("studies/run"),
    seeds: Annotated[str, typer.Option(help="comma-separated seeds of the target runs")] = "0",
    source_config: Annotated[Path | None, typer.Option(
        help="JSON TrainConfig of the source runs")] = None,
    target_config: Annotated[Path | None, typer.Option(
        help="JSON TrainConfig of the target runs (baselines and transfers)")] = None,
    source_steps: Annotated[int | None, typer.Option(help="the source runs' steps")] = None,
    target_steps: Annotated[int | None, typer.Option(help="the target runs' steps")] = None,
    key_step: StudyOption = None,
    prompt_length: StudyOption = None,
    batch_size: StudyOption = None,
    eval_examples: StudyOption = None,
    test_examples: Annotated[int | None, typer.Option(
        help="test rows scored per target run (default 200)")] = None,
    backbone: ConfigBackbone = None,
    labels: Labels = None,
    template: Template = DEFAULT_TEMPLATE,
    label_field: LabelField = "label",
    ray: RayAddress = None,
    cpus_per_run: CpusPerRun = 1,
    shared_runs: SharedRuns = False,
) -> None:
    """Train sources, baselines and every source->target transfer; write results.jsonl.

    Both configs start from TrainConfig's defaults and the backbone's recommended overrides;
    flags win. Task files share --labels, --template and --label-field; a .json task spec has
    its own."""
    from spot import backbones
    from spot.study import StudyConfig, run_study
    from spot.tasks import list_tasks

    args = TaskArgs(labels, template, label_field)
    given = {name: _task(name, args) for name in {*sources.split(","), *targets.split(",")}}
    names = {name: task.name for name, task in given.items()}
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    shared = dict(backbone=backbone, key_step=key_step, prompt_length=prompt_length,
                  batch_size=batch_size, eval_examples=eval_examples)
    source_names = tuple(names[s] for s in sources.split(","))
    target_names = tuple(names[t] for t in targets.split(","))
    config = StudyConfig(
        source_names, target_names,
        TrainConfig.build(source_config, task=source_names[0], steps=source_steps, **shared),
        TrainConfig.build(target_config, task=target_names[0], steps=target_steps, **shared),
        seed_list, **({} if test_examples is None else {"test_examples": test_examples}))
    files = {task.name: task for task in given.values() if task.name not in list_tasks()}
    if ray is None:
        run_study(backbones.load(config.source.backbone), config, out, files)
    else:
        from spot.ray_runner import ray_options, run_study_on_ray

        run_study_on_ray(config.source.backbone, config, out, files,
                         ray_options(ray, cpus_per_run, out, shared_runs))
    console.print(f"results in {out / 'results.jsonl'}")


@_command("build", library_app)
@_train_options
def library_build(
    library: Annotated[Path, typer.Argument(help="library directory (created if missing)")],
    tasks: Annotated[str, typer.Option(help="comma-separated source tasks (names or files)")],
    runs: Annotated[Path, typer.Option(help="run folder, one run per task (resumes)")] = Path(
        "runs/sources"),
    backbone: ConfigBackbone = None,
    config: ConfigFile = None,
    recipe: Annotated[list[str] | None, typer.Option(
        help="key recipe(s) to publish, each by the library's protocol (default: gradient)")] = None,
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


@_command()
def heatmap(
    results: Annotated[Path, typer.Argument(help="study folder")],
    out: Annotated[Path, typer.Option(help="where the PNGs go")] = Path("figures"),
) -> None:
    """Transferability figures (similarity, transfer, scatter, retrieval curve) as PNG."""
    from spot.figures import write_figures

    for path in write_figures(results, out):
        console.print(str(path))


@_command()
def serve(
    library: Annotated[Path, typer.Option(help="library directory")],
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens_file: Annotated[Path | None, typer.Option(help="one bearer token per line")] = None,
    backbone: Annotated[str | None, typer.Option(help="also serve POST /v1/predict")] = None,
    open_reads: bool = True,
    public_status: Annotated[
        bool, typer.Option(help="with --no-open-reads, still show counts on /healthz, /metrics")
    ] = False,
    read_only: Annotated[
        bool, typer.Option(help="refuse publish and delete (automatic if not writable)")
    ] = False,
    max_upload_bytes: Annotated[int, typer.Option(help="largest request body")] = 64 * 2**20,
    max_prompt_length: Annotated[
        int, typer.Option(help="longest prompt (L) a publish or query may hold")
    ] = 1024,
) -> None:
    """Run the retrieval service (model-free unless --backbone is given)."""
    import uvicorn

    from retrieval_api.app import create_app, load_tokens

    app_ = create_app(
        library,
        tokens=load_tokens(tokens_file),
        open_reads=open_reads,
        max_upload_bytes=max_upload_bytes,
        max_prompt_length=max_prompt_length,
        read_only=read_only,
        public_status=public_status,
    )
    if backbone is not None:
        from library import Library
        from spot import backbones
        from spot.predict import Predictor
        from spot.predict_http import add_predict_route

        model = backbones.load(backbone)
        add_predict_route(app_, Predictor(model, Library(library, read_only=read_only)))
    uvicorn.run(app_, host=host, port=port)


@_command()
def inspect(
    prompt: Annotated[Path, typer.Argument(help="prompt file or PEFT adapter directory")],
    backbone: Backbone = "smollm2-135m",
    top: int = 5,
) -> None:
    """Nearest vocabulary tokens of each prompt token, and token norms."""
    from spot import backbones
    from spot.interpret import inspect_prompt, render
    from spot.prompts import load_for_backbone

    _read_prompt(prompt)
    model = backbones.load(backbone)
    soft, _ = load_for_backbone(prompt, model)
    console.print(render(inspect_prompt(model, soft, top)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
