"""`spot` command line: the only place that wires backbones, tasks, training and storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SPoT: soft prompt transfer.")
console = Console()

Backbone = Annotated[str, typer.Option(help="registered name or checkpoint directory")]
# for commands that also read a config file: None keeps the file's backbone
ConfigBackbone = Annotated[str | None, typer.Option(
    help="registered name or checkpoint directory (default: the config file's, else smollm2-135m)")]
ConfigFile = Annotated[Path | None, typer.Option(help="JSON TrainConfig; flags override it")]


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)


def _train_config(config: Path | None, defaults: dict, **flags):
    """A TrainConfig from the config file (or `defaults` without one), flags that are not None win."""
    from spot.train import TrainConfig

    given = {k: v for k, v in flags.items() if v is not None}
    if config is not None:
        return TrainConfig.from_file(config, **given)
    return TrainConfig(**{**defaults, **given})


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
    task: Annotated[str | None, typer.Option(help="registered task name")] = None,
    out: Annotated[Path, typer.Option(help="run directory (resumes if it exists)")] = Path("runs/train"),
    backbone: ConfigBackbone = None,
    config: ConfigFile = None,
    steps: int | None = None,
    key_step: int | None = None,
    eval_every: int | None = None,
    eval_examples: int | None = None,
    batch_size: int | None = None,
    prompt_length: int | None = None,
    init: Annotated[str | None, typer.Option(help="random_uniform|sampled_vocab|class_labels|text:..|file:..")] = None,
    optimizer: str | None = None,
    learning_rate: float | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    objective: Annotated[str | None, typer.Option(help="lm (default) | choices")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant (default) | linear | cosine")] = None,
    reparameterization: Annotated[str | None, typer.Option(
        help="none (default) | residual (an MLP over the prompt, training only; width and "
             "learning-rate scale in the config file)")] = None,
    prompt_ema: Annotated[float | None, typer.Option(
        help="decay of an exponential moving average of the prompt; keys, values and "
             "validation use the average (default 0: the prompt itself)")] = None,
    balance_classes: Annotated[bool | None, typer.Option(
        help="batches take the classes in turn (equal shares) instead of uniform sampling")] = None,
) -> None:
    """Prompt-tune a task; writes key (early) and value (best) prompts into OUT."""
    from spot import backbones
    from spot.tasks import get_task
    from spot.train import train as run_training

    overrides = dict(task=task, backbone=backbone, steps=steps, key_step=key_step,
                     eval_every=eval_every, eval_examples=eval_examples, batch_size=batch_size,
                     prompt_length=prompt_length, init=init, optimizer=optimizer,
                     learning_rate=learning_rate, max_length=max_length, seed=seed,
                     objective=objective, schedule=schedule,
                     reparameterization=reparameterization, prompt_ema=prompt_ema,
                     balance_classes=balance_classes)
    try:
        if config is None and task is None:
            raise ValueError("--task or --config is required")
        defaults = {"key_step": max(1, steps // 6)} if steps is not None else {}
        cfg = _train_config(config, defaults, **overrides)
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
    prompt: Annotated[Path | None, typer.Option(help="prompt file (omit for zero-shot)")] = None,
    backbone: Backbone = "smollm2-135m",
    split: str = "test",
    limit: Annotated[int | None, typer.Option(help="first N of a fixed sample")] = None,
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


library_app = typer.Typer(no_args_is_help=True, help="Inspect and repair a local prompt library.")
app.add_typer(library_app, name="library")

LibraryDir = Annotated[Path | None, typer.Option("--library", help="local library directory")]
Remote = Annotated[str | None, typer.Option(help="retrieval service URL instead of a local library")]
Token = Annotated[str | None, typer.Option(envvar="SPOT_API_TOKEN", help="bearer token for --remote")]


def _prompt_source(library: Path | None, remote: str | None, token: str | None):
    """A local Library or a RetrievalClient: both offer publish/query/read_bytes."""
    if (library is None) == (remote is None):
        raise ValueError("give exactly one of --library DIR or --remote URL")
    if remote is not None:
        from retrieval_api.client import RetrievalClient

        return RetrievalClient(remote, token)
    from library import Library

    return Library(library)


@app.command("train-source")
def train_source(
    task: Annotated[str, typer.Option(help="registered task name")],
    out: Annotated[Path, typer.Option(help="run directory")],
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
    backbone: ConfigBackbone = None,
    config: ConfigFile = None,
    steps: Annotated[int | None, typer.Option(help="default 300 without --config")] = None,
    key_step: Annotated[int | None, typer.Option(help="default 50 without --config")] = None,
    eval_every: Annotated[int | None, typer.Option(help="default 50 without --config")] = None,
    batch_size: int | None = None,
    prompt_length: int | None = None,
    seed: int | None = None,
) -> None:
    """Train a source prompt and publish its key and value in one go."""
    from spot import backbones
    from spot.tasks import get_task
    from spot.train import train as run_training

    try:
        source = _prompt_source(library, remote, token)
        cfg = _train_config(config, {"steps": 300, "key_step": 50, "eval_every": 50}, task=task,
                            backbone=backbone, steps=steps, key_step=key_step,
                            eval_every=eval_every, batch_size=batch_size,
                            prompt_length=prompt_length, seed=seed)
        run_training(backbones.load(cfg.backbone), get_task(cfg.task), cfg, out)
        ids = source.publish(out / "key.safetensors", out / "value.safetensors", {"task": cfg.task})
    except (ValueError, KeyError, OSError) as error:
        _fail(error)
    console.print(f"published {task}: key {ids.key}, value {ids.value}")


@app.command()
def publish(
    key: Annotated[Path, typer.Option(help="key prompt file (early checkpoint)")],
    value: Annotated[Path | None, typer.Option(help="value prompt file (best checkpoint)")] = None,
    task: Annotated[str | None, typer.Option(help="task name if the files do not record it")] = None,
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
) -> None:
    """Publish a source's key (and value) prompt files."""
    try:
        source = _prompt_source(library, remote, token)
        ids = source.publish(key, value, {"task": task} if task else None)
    except (ValueError, KeyError, OSError) as error:
        _fail(error)
    console.print(json.dumps({"key": ids.key, "value": ids.value}))


def _show_matches(retrieved) -> None:
    table = Table("rank", "source task", "similarity", "key id", "value id")
    for rank, r in enumerate(retrieved, 1):
        table.add_row(str(rank), r.task, f"{r.similarity:.4f}", r.key_id, r.value_id)
    console.print(table)


@app.command()
def query(
    task: Annotated[str | None, typer.Option(help="train a query prompt on this task")] = None,
    prompt: Annotated[Path | None, typer.Option(help="or use this query prompt file")] = None,
    out: Annotated[Path, typer.Option(help="run directory for the query prompt")] = Path("runs/query"),
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
    backbone: ConfigBackbone = None,
    config: Annotated[Path | None, typer.Option(
        help="JSON TrainConfig for the query prompt; flags override it")] = None,
    k: int = 3,
    metric: str = "token",
    key_step: Annotated[int | None, typer.Option(help="query training steps (default 50)")] = None,
) -> None:
    """Top-k source prompts for a target task (or a query prompt file)."""
    from spot import backbones
    from spot.prompts import load_for_backbone
    from spot.tasks import get_task
    from spot.transfer import query_prompt, retrieve

    try:
        source = _prompt_source(library, remote, token)
        if prompt is not None:
            model = backbones.load(backbone or backbones.DEFAULT_BACKBONE)
            soft, _ = load_for_backbone(prompt, model)
        elif task is not None or config is not None:
            cfg = _train_config(config, {"key_step": 50}, task=task, backbone=backbone,
                                key_step=key_step)
            model = backbones.load(cfg.backbone)
            soft = query_prompt(model, get_task(cfg.task), cfg, out)
        else:
            raise ValueError("give --task or --prompt")
        _show_matches(retrieve(source, model, soft, k, metric))
    except (ValueError, KeyError, OSError) as error:
        _fail(error)


@app.command("tune-target")
def tune_target(
    task: Annotated[str, typer.Option(help="target task")],
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/target"),
    strategy: Annotated[str, typer.Option(help="best-of-k | weighted | mixture")] = "best-of-k",
    k: int = 3,
    metric: str = "token",
    library: LibraryDir = None,
    remote: Remote = None,
    token: Token = None,
    backbone: ConfigBackbone = None,
    config: Annotated[Path | None, typer.Option(
        help="JSON TrainConfig for the query, transfer and baseline runs; flags override it")] = None,
    steps: Annotated[int | None, typer.Option(help="default 100 without --config")] = None,
    key_step: Annotated[int | None, typer.Option(help="default 20 without --config")] = None,
    batch_size: int | None = None,
    prompt_length: int | None = None,
    baseline: Annotated[bool, typer.Option(
        help="also tune from the config's init (sampled vocab by default); report RER")] = True,
    test_examples: int = 500,
) -> None:
    """Query the library with the target, then tune it from the top-k sources."""
    from spot import backbones
    from spot.tasks import get_task
    from spot.train import train as run_training
    from spot.transfer import held_out_score, query_prompt, relative_error_reduction, retrieve
    from spot.transfer import tune_target as run_transfer

    try:
        source = _prompt_source(library, remote, token)
        plain = {"steps": 100 if steps is None else steps,
                 "key_step": 20 if key_step is None else key_step}
        plain["eval_every"] = max(plain["key_step"], plain["steps"] // 4)  # four evaluations
        cfg = _train_config(config, plain, task=task, backbone=backbone, steps=steps,
                            key_step=key_step, batch_size=batch_size, prompt_length=prompt_length)
        model = backbones.load(cfg.backbone)
        target = get_task(cfg.task)
        retrieved = retrieve(source, model, query_prompt(model, target, cfg, out / "query"), k,
                             metric, exclude=[task])
        _show_matches(retrieved)
        sources = [get_task(r.task) for r in retrieved] if strategy == "mixture" else []
        result = run_transfer(model, target, retrieved, strategy, cfg, out / strategy, sources)
        score = held_out_score(model, target, result.result, test_examples)
        table = Table("init", f"test {target.metrics[0]}", "relative error reduction")
        if baseline:
            base = run_training(model, target, cfg, out / "baseline", show_progress=False)
            base_score = held_out_score(model, target, base, test_examples)
            table.add_row(f"{cfg.init} (baseline)", f"{base_score:.2f}", "")
            table.add_row(strategy, f"{score:.2f}",
                          f"{relative_error_reduction(base_score, score):+.3f}")
        else:
            table.add_row(strategy, f"{score:.2f}", "")
        console.print(table)
    except (ValueError, KeyError, OSError) as error:
        _fail(error)


@library_app.command("list")
def library_list(
    library: Annotated[Path, typer.Argument(help="library directory")],
    task: str | None = None,
    role: str | None = None,
    limit: int = 100,
) -> None:
    """List entries."""
    from library import Library

    table = Table("id", "task", "role", "step", "score", "L", "backbone")
    for e in Library(library).list(task=task, role=role, limit=limit):
        table.add_row(e.id, e.task, e.role, str(e.step), f"{e.score or 0:.2f}", str(e.length),
                      e.backbone)
    console.print(table)


@library_app.command("verify")
def library_verify(library: Annotated[Path, typer.Argument(help="library directory")]) -> None:
    """Check every file against the manifest; sweep orphans; refresh stale indexes."""
    from library import Library

    report = Library(library).verify()
    console.print_json(json.dumps(report.to_dict()))
    if not report.ok:
        raise typer.Exit(1)


@library_app.command("rebuild")
def library_rebuild(library: Annotated[Path, typer.Argument(help="library directory")]) -> None:
    """Rebuild every FAISS index from the manifest and files."""
    from library import Library

    console.print_json(json.dumps(Library(library).rebuild()))


@library_app.command("import-npy")
def library_import_npy(
    library: Annotated[Path, typer.Argument(help="library directory")],
    files: Annotated[list[Path], typer.Argument(help=".npy prompts; task = file stem")],
    backbone: Annotated[str, typer.Option(help="backbone identity to record")],
) -> None:
    """Import released `.npy` prompts (e.g. Google's) as key+value entries."""
    from library import Library, import_npy

    store = Library(library)
    for path in files:
        prompt = import_npy(path)
        ids = store.publish(prompt, prompt, {"task": path.stem, "backbone": backbone})
        console.print(f"{path.stem}: key {ids.key}, value {ids.value}")


@app.command()
def study(
    sources: Annotated[str, typer.Option(help="comma-separated source tasks")],
    targets: Annotated[str, typer.Option(help="comma-separated target tasks")],
    out: Annotated[Path, typer.Option(help="study folder (resumes)")] = Path("studies/run"),
    seeds: str = "0",
    source_steps: int = 60,
    target_steps: int = 30,
    key_step: int = 10,
    prompt_length: int = 20,
    batch_size: int = 8,
    eval_examples: int = 100,
    test_examples: int = 200,
    backbone: Backbone = "smollm2-135m",
) -> None:
    """Train sources, baselines and every source->target transfer; write results.jsonl."""
    from spot import backbones
    from spot.study import StudyConfig, run_study

    config = StudyConfig(tuple(sources.split(",")), tuple(targets.split(",")),
                         tuple(int(s) for s in seeds.split(",")), source_steps, target_steps,
                         key_step, prompt_length, batch_size, eval_examples, test_examples)
    try:
        run_study(backbones.load(backbone), config, out)
    except (ValueError, KeyError, OSError) as error:
        _fail(error)
    console.print(f"results in {out / 'results.jsonl'}")


@app.command()
def heatmap(
    results: Annotated[Path, typer.Argument(help="study folder")],
    out: Annotated[Path, typer.Option(help="where the PNGs go")] = Path("figures"),
) -> None:
    """Transferability figures (similarity, transfer, scatter, retrieval curve) as PNG."""
    from spot.figures import write_figures

    try:
        paths = write_figures(results, out)
    except (ValueError, OSError) as error:
        _fail(error)
    for path in paths:
        console.print(str(path))


@app.command()
def serve(
    library: Annotated[Path, typer.Option(help="library directory")],
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens_file: Annotated[Path | None, typer.Option(help="one bearer token per line")] = None,
    backbone: Annotated[str | None, typer.Option(help="also serve POST /v1/predict")] = None,
    open_reads: bool = True,
) -> None:
    """Run the retrieval service (model-free unless --backbone is given)."""
    import uvicorn

    from retrieval_api.app import create_app, load_tokens

    app_ = create_app(library, tokens=load_tokens(tokens_file), open_reads=open_reads)
    if backbone is not None:
        from library import Library
        from spot import backbones
        from spot.serve import Predictor
        from spot.serve_http import add_predict_route

        add_predict_route(app_, Predictor(backbones.load(backbone), Library(library)))
    uvicorn.run(app_, host=host, port=port)


@app.command()
def inspect(
    prompt: Annotated[Path, typer.Argument(help="prompt file")],
    backbone: Backbone = "smollm2-135m",
    top: int = 5,
) -> None:
    """Nearest vocabulary tokens of each prompt token, and token norms."""
    from spot import backbones
    from spot.interpret import inspect_prompt, render
    from spot.prompts import load_for_backbone

    model = backbones.load(backbone)
    soft, _ = load_for_backbone(prompt, model)
    console.print(render(inspect_prompt(model, soft, top)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
