"""`spot export` and `spot import`: prompt files to and from PEFT adapters and .npy arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spot.cli_common import Backbone, _command, console


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
