"""`spot study`, `spot heatmap`, `spot serve` and `spot inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spot.cli_common import (
    DEFAULT_TEMPLATE,
    Backbone,
    ConfigBackbone,
    CpusPerRun,
    LabelField,
    Labels,
    RayAddress,
    SharedRuns,
    TaskArgs,
    Template,
    _command,
    _read_prompt,
    _task,
    console,
)
from spot.train import TrainConfig

StudyOption = Annotated[int | None, typer.Option(help="sets it in both configs")]


@_command()
def study(
    sources: Annotated[str, typer.Option(help="comma-separated source tasks (names or files; "
                                               "with --library: the library's task names)")],
    targets: Annotated[str, typer.Option(help="comma-separated target tasks (names or files)")],
    out: Annotated[Path, typer.Option(help="study folder (resumes)")] = Path("studies/run"),
    seeds: Annotated[str, typer.Option(help="comma-separated seeds of the target runs")] = "0",
    library: Annotated[Path | None, typer.Option(
        help="take the sources' values and keys from this library (no source runs)")] = None,
    pick_seeds: Annotated[str, typer.Option(
        help="with --library: more seeds, run on each target's top-k picks only")] = "",
    k: Annotated[int, typer.Option(help="with --library: picks per target and sources in the "
                                   "weighted init")] = 3,
    pick_by: Annotated[str | None, typer.Option(
        help="similarity ranking the picks, e.g. gradient/token (default: the library's "
             "default recipe, token)")] = None,
    baseline_inits: Annotated[str, typer.Option(
        help="'|'-separated inits; the baseline takes the best on validation at seed 0")] = "",
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
    """Train sources (or take them from --library), baselines and every source->target
    transfer; write results.jsonl.

    Both configs start from TrainConfig's defaults and the backbone's recommended overrides;
    flags win. Task files share --labels, --template and --label-field; a .json task spec has
    its own."""
    from spot import backbones
    from spot.study import StudyConfig, run_study
    from spot.tasks import list_tasks

    args = TaskArgs(labels, template, label_field)
    # a library study's sources are the library's entries, by task name: their data is not read
    tasks = {*targets.split(","), *(() if library else sources.split(","))}
    given = {name: _task(name, args) for name in tasks}
    names = {name: task.name for name, task in given.items()}
    seed_list, pick_list = _seeds("--seeds", seeds), _seeds("--pick-seeds", pick_seeds)
    shared = dict(backbone=backbone, key_step=key_step, prompt_length=prompt_length,
                  batch_size=batch_size, eval_examples=eval_examples)
    source_names = tuple(names.get(s, s) for s in sources.split(","))
    target_names = tuple(names[t] for t in targets.split(","))
    if library is not None and (source_config or source_steps):
        raise ValueError("--library takes its sources from the library: no source config")
    config = StudyConfig(
        source_names, target_names,
        None if library else TrainConfig.build(
            source_config, task=source_names[0], steps=source_steps, **shared),
        TrainConfig.build(target_config, task=target_names[0], steps=target_steps, **shared),
        seed_list, **({} if test_examples is None else {"test_examples": test_examples}),
        library=None if library is None else str(library), pick_seeds=pick_list, k=k,
        pick_by=pick_by, baseline_inits=tuple(i for i in baseline_inits.split("|") if i))
    files = {task.name: task for task in given.values() if task.name not in list_tasks()}
    if ray is None:
        run_study(backbones.load(config.target.backbone), config, out, files)
    elif library is not None:
        from spot.ray_library_study import run_library_study_on_ray
        from spot.ray_runner import ray_options

        run_library_study_on_ray(config.target.backbone, backbones.load(config.target.backbone),
                                 config, out, files, ray_options(ray, cpus_per_run, out,
                                                                 shared_runs))
    else:
        from spot.ray_runner import ray_options, run_study_on_ray

        run_study_on_ray(config.target.backbone, config, out, files,
                         ray_options(ray, cpus_per_run, out, shared_runs))
    console.print(f"results in {out / 'results.jsonl'}")


def _seeds(option: str, given: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in given.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {given!r}") from None


@_command()
def heatmap(
    results: Annotated[Path, typer.Argument(help="study folder")],
    out: Annotated[Path, typer.Option(help="where the PNGs go")] = Path("figures"),
) -> None:
    """Transferability figures as PNG: similarity heatmaps and scatters per similarity name,
    the transfer heatmap, the retrieval curve and retrieval quality."""
    from spot.analysis import load_study
    from spot.figures import write_figures

    for path in write_figures(load_study(results), out):
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
