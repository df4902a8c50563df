"""User errors in `spot`: one line with the exact message, exit status 2, no traceback, and no
backbone loaded when the arguments, files or library already tell."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from library import Library
from spot.cli import app

KNOWN = "tiny_polarity"


@pytest.fixture
def files(tmp_path, tiny_llama):
    """The files the bad inputs name: a CSV, task files, libraries (empty, another backbone's)."""
    (tmp_path / "file.csv").write_text("a,b\n1,2\n")
    (tmp_path / "data.jsonl").write_text('{"text": "good", "label": "p"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "good", "label": "p"}\n'
                                        '{"text": "bad", "label": "x"}\n')
    (tmp_path / "spec.json").write_text(json.dumps({"data": "data.jsonl", "labels": ["n", "p"],
                                                    "labes": 1}))
    Library(tmp_path / "empty").close()
    other = Library(tmp_path / "other")
    prompt = np.ones((2, tiny_llama.d_model), np.float32)
    other.publish(prompt, prompt, {"task": "src", "backbone": "other-backbone"})
    np.save(tmp_path / "p.npy", prompt)
    return tmp_path


# (arguments, exact message, whether the backbone was loaded before the error)
CASES = [
    (["inspect", "missing.safetensors"],
     "missing.safetensors: cannot read prompt file: No such file or directory", False),
    (["library", "import-npy", "{d}/lib", "{d}/file.csv", "--backbone", "x"],
     "{d}/file.csv: cannot import .npy prompt: not a .npy file (no NumPy header)", False),
    (["library", "list", "{d}/nope"], "{d}/nope is not a prompt library (no manifest.sqlite)",
     False),
    (["train", "--task", KNOWN, "--learning-rate", "-1"],
     "learning_rate must be positive, got -1.0", False),
    (["train", "--task", KNOWN, "--steps", "0"], "steps must be at least 1, got 0", False),
    (["train", "--task", KNOWN, "--steps", "4", "--key-step", "5"],
     "key_step 5 must lie in [1, steps=4]", False),
    (["train"], "--task or --config is required", False),
    (["train", "--task", "reviews.csv"], "task file reviews.csv not found", False),
    (["train", "--task", "{d}/data.jsonl"],
     "{d}/data.jsonl is a task file: give its label values with --labels a,b,...", False),
    (["train", "--task", "{d}/bad.jsonl", "--labels", "n,p"],
     "{d}/bad.jsonl:2: label 'x' not in labels ['n', 'p']", False),
    (["train", "--task", "{d}/spec.json"],
     "{d}/spec.json: unknown task spec keys ['labes'] (known: ['data', 'labels', 'template', "
     "'label_field', 'choices', 'name', 'metrics'])", False),
    (["eval", "--task", KNOWN, "--split", "dev"],
     "unknown split 'dev'; splits are train, validation, test", False),
    (["eval", "--task", KNOWN, "--prompt", "{d}/file.csv"],
     "{d}/file.csv: not a safetensors file: header length 734698278354037857 is invalid for "
     "8 bytes", False),
    (["query", "--task", KNOWN, "--library", "{d}/nope"],
     "{d}/nope is not a prompt library (no manifest.sqlite)", False),
    (["query", "--task", KNOWN, "--library", "{d}/empty"], "{d}/empty holds no prompts to search",
     False),
    (["query", "--task", KNOWN, "--library", "{d}/other"],
     "{d}/other holds no prompts for backbone tiny-llama ({identity}); it holds other-backbone",
     True),
    (["query", "--library", "{d}/other"], "give exactly one of --task or --prompt", False),
    (["tune-target", "--task", KNOWN, "--library", "{d}/other", "--strategy", "best"],
     "unknown strategy 'best'; choose one of best-of-k, weighted, mixture", False),
    (["tune-target", "--task", KNOWN, "--library", "{d}/nope"],
     "{d}/nope is not a prompt library (no manifest.sqlite)", False),
    (["publish", "--key", "{d}/missing.safetensors", "--library", "{d}/lib"],
     "{d}/missing.safetensors: cannot read prompt file: No such file or directory", False),
    (["export", "{d}/missing.safetensors", "{d}/out"],
     "{d}/missing.safetensors: cannot read prompt file: No such file or directory", False),
    (["import", "{d}/file.csv", "--out", "{d}/x.safetensors"],
     "{d}/file.csv: cannot import .npy prompt: not a .npy file (no NumPy header)", False),
    (["study", "--sources", KNOWN, "--targets", "tiny_length", "--seeds", "a"],
     "--seeds must be comma-separated integers, got 'a'", False),
    (["study", "--sources", "nothing", "--targets", KNOWN],
     "unknown task 'nothing'; known tasks: ", False),
    (["study", "--sources", KNOWN, "--targets", "tiny_length", "--pick-seeds", "1"],
     "pick_seeds need a library study (picks rank library keys)", False),
    (["study", "--sources", KNOWN, "--targets", "tiny_length", "--library", "{d}/lib",
      "--source-steps", "4"],
     "--library takes its sources from the library: no source config", False),
    (["heatmap", "{d}/nope"], "{d}/nope: not a study folder", False),
]


@pytest.mark.parametrize(("args", "message", "loads"), CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_bad_input_is_one_line_without_a_traceback(cli, files, tiny_llama, args, message, loads):
    invoke, _, _ = cli
    fill = {"d": files, "identity": tiny_llama.identity}
    result = CliRunner().invoke(app, [a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no other exception escaped
    text = result.output.strip()
    expected = "error: " + message.format(**fill)
    if message.endswith(": "):  # the rest lists every registered task
        assert text.startswith(expected) and "\n" not in text
    else:
        assert text == expected
    assert invoke.loaded == (["smollm2-135m"] if loads else [])
