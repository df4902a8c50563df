"""Study grids and library builds on a local Ray with the tiny model (one Ray session).

Workers rebuild the tiny model from the backbone spec `conftest:make_tiny_llama` (tests/ is on
their PYTHONPATH) and get the tiny tasks' rows from the driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_tasks import publish_tiny_sources, register_tiny_tasks

from library import Library
from spot.study import StudyConfig, run_study
from spot.train import TrainConfig

# Ray starts its processes by fork + exec, which JAX's fork warning does not tell apart from a fork
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
TESTS = Path(__file__).resolve().parent
TINY = "conftest:make_tiny_llama"
BASE = TrainConfig(task="base", steps=4, key_step=2, eval_every=4, batch_size=4, prompt_length=4,
                   eval_examples=8, max_length=32, learning_rate=0.05)


def study_config() -> StudyConfig:
    names = register_tiny_tasks()
    return StudyConfig(sources=(names[0], names[2]), targets=(names[1], names[2]), source=BASE,
                       target=BASE, seeds=(0,), test_examples=16)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(study: Path) -> dict:
    ids = sorted(e.id for e in Library(study / "library").list(limit=100))
    return {"results": _read(study / "results.jsonl"),
            "similarity": _read(study / "similarity.jsonl"), "library": ids}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), saved]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def sequential(tiny_llama, tmp_path_factory):
    return _files(run_study(tiny_llama, study_config(), tmp_path_factory.mktemp("seq") / "study"))


def test_grid_on_ray_equals_sequential(local_ray, sequential, tmp_path):
    from spot.ray_runner import RayOptions, run_study_on_ray

    # run directories in the workers' temp dirs: nothing but the driver writes the study folder
    out = run_study_on_ray(TINY, study_config(), tmp_path / "study", options=RayOptions())
    assert _files(out) == sequential
    assert sorted(p.name for p in out.iterdir()) == [
        "library", "queries", "results.jsonl", "similarity.jsonl", "study.json", "tasks.json",
        "weighted.jsonl"]


def _kill_first_run(killed: list[int], stop: threading.Event) -> None:
    """kill -9 the first Ray worker seen running a training run (Ray titles it ray::<function>)."""
    while not stop.is_set() and not killed:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                title = (proc / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith((b"ray::source_run", b"ray::target_run")):
                time.sleep(0.3)  # mid-run
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
                return
        time.sleep(0.05)


def test_killed_worker_is_retried_and_every_cell_is_written_once(local_ray, sequential, tmp_path):
    from spot.ray_runner import RayOptions, run_study_on_ray

    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_run, args=(killed, stop), daemon=True)
    killer.start()
    try:
        out = run_study_on_ray(TINY, study_config(), tmp_path / "study",
                               options=RayOptions(run_root=tmp_path / "study"))
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed"
    files = _files(out)
    cells = [(r["source"], r["target"], r["seed"]) for r in files["results"]]
    assert len(cells) == len(set(cells)) == 4
    assert files == sequential


def test_library_build_on_ray_publishes_what_a_sequential_build_does_once(
    local_ray, cli, tmp_path
):
    invoke, names, _ = cli
    train = ["--backbone", TINY, "--steps", "4", "--key-step", "2", "--eval-every", "4",
             "--batch-size", "4", "--prompt-length", "4", "--eval-examples", "8"]

    def build(library: Path, *ray: str) -> list[str]:
        output = invoke("library", "build", library, "--tasks", ",".join(names[:2]),
                        "--runs", tmp_path / "runs" / library.name, *train, *ray)
        return sorted(line for line in output.splitlines() if line.startswith("published"))

    sequential = build(tmp_path / "seq")
    assert len(sequential) == 2
    assert build(tmp_path / "ray", "--ray", "auto") == sequential
    # every run again (in the workers' temp dirs), as if each were retried after its first
    # result was published
    address = local_ray.get_runtime_context().gcs_address
    assert build(tmp_path / "ray", "--ray", address) == sequential
    entries = Library(tmp_path / "ray").list(limit=100)
    assert len(entries) == 4  # a key and a value per source, once


def test_study_without_ray_does_not_import_ray(tmp_path):
    code = f"""
import sys
from tiny_tasks import publish_tiny_sources, register_tiny_tasks
from typer.testing import CliRunner
from spot.cli import app
names = register_tiny_tasks()
result = CliRunner().invoke(app, ["study", "--sources", names[0], "--targets", names[1],
    "--out", {str(tmp_path / 'study')!r}, "--backbone", {TINY!r}, "--source-steps", "2",
    "--target-steps", "2", "--key-step", "1", "--prompt-length", "2", "--batch-size", "2",
    "--eval-examples", "4", "--test-examples", "4"])
assert result.exit_code == 0, result.output
assert "ray" not in sys.modules
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_library_study_on_ray_equals_sequential(local_ray, tiny_llama, tmp_path):
    from spot.ray_library_study import run_library_study_on_ray
    from spot.ray_runner import RayOptions

    names = register_tiny_tasks()
    library = Library(tmp_path / "library")
    publish_tiny_sources(tiny_llama, library, (names[0], names[2]), BASE, tmp_path / "sources")
    config = StudyConfig(sources=(names[0], names[2]), targets=(names[1],), source=None,
                         target=BASE, seeds=(0,), test_examples=16, library=str(library.root),
                         pick_seeds=(1,), k=1, baseline_inits=("class_labels", "sampled_vocab"))

    def files(study: Path) -> dict:
        found = {f: _read(study / f) for f in ("results.jsonl", "weighted.jsonl",
                                               "similarity.jsonl")}
        found["zero"] = sorted(_read(study / "zero_step.jsonl"), key=json.dumps)
        found["init"] = json.loads((study / "targets" / names[1] / "init.json").read_text())
        return found

    sequential = files(run_study(tiny_llama, config, tmp_path / "seq"))
    # run directories in the workers' temp dirs: the driver writes every file
    out = run_library_study_on_ray(TINY, tiny_llama, config, tmp_path / "ray", None, RayOptions())
    assert files(out) == sequential
    assert [r["seed"] for r in sequential["results.jsonl"]] == [0, 0, 1]
    assert [w["seed"] for w in sequential["weighted.jsonl"]] == [0, 1]
