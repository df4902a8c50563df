"""Shared pieces of the `spot` command line (`spot.cli`): the app objects, option types, task and
prompt-source helpers, and the decorators that register commands.
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
Recipes = Annotated[list[str] | None, typer.Option(
    help="key recipe(s) to publish, each by the library's protocol (default: gradient)")]
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


RayAddress = Annotated[str | None, typer.Option(
    help="run each training run as a Ray task: auto (start a local Ray) or a cluster's address",
    rich_help_panel="Ray")]
CpusPerRun = Annotated[int, typer.Option(
    help="CPUs per run (--ray auto: one worker per this many CPUs)", rich_help_panel="Ray")]
SharedRuns = Annotated[bool, typer.Option(
    help="with --ray ADDRESS: the run folder is on storage every worker sees at the same path "
         "(runs write and resume there; default: each worker's temp dir)", rich_help_panel="Ray")]
