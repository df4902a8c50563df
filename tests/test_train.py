"""Trainer: prompt-only updates, key/value checkpoints, resume, data parallelism, failures."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from tiny_tasks import polarity_task

import spot.train
from library.prompt_file import load_prompt
from spot.backbones.base import BackboneError
from spot.batching import encode, make_batch
from spot.tasks import Task
from spot.train import TrainConfig, TrainingError, choice_loss, learning_rate_schedule, train

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(task="tiny_polarity", backbone="tiny", prompt_length=4, batch_size=8, steps=24,
            key_step=8, eval_every=8, eval_examples=32, max_length=32, learning_rate=0.3)


def test_only_the_prompt_learns_and_loss_falls(tiny_llama, tmp_path):
    before = jax.tree_util.tree_map(np.array, tiny_llama.params)
    config = TrainConfig(**FAST)
    result = train(tiny_llama, polarity_task(), config, tmp_path, show_progress=False)
    after = jax.tree_util.tree_map(np.array, tiny_llama.params)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=False):
        np.testing.assert_array_equal(a, b)  # frozen weights bit-identical
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0]
    key, key_meta = load_prompt(tmp_path / "key.safetensors")
    value, value_meta = load_prompt(tmp_path / "value.safetensors")
    assert key_meta["role"] == "key" and key_meta["step"] == "8"
    assert value_meta["role"] == "value" and float(value_meta["score"]) == result.value_score
    assert key_meta["backbone"] == tiny_llama.identity and key.shape == value.shape == (4, 32)
    best = max(result.history, key=lambda r: r["accuracy"])
    assert int(value_meta["step"]) == best["step"]
    assert result.value_score >= result.history[0]["accuracy"]


def test_choice_loss(tiny_llama):
    examples = polarity_task().load("train")[:6]
    batch = make_batch(encode(tiny_llama, examples), range(6), tiny_llama.pad_id, batch_size=8)
    prompt = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)), jnp.float32)
    scores = np.asarray(tiny_llama.score(prompt, batch))[:6]  # the two padding rows do not count
    log_probs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(6), batch["labels"][:6]])
    loss = choice_loss(tiny_llama.score_fn)(tiny_llama.params, prompt, batch)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"schedule": "linear"}])
def test_resume_equals_uninterrupted(tiny_llama, tmp_path, options):
    config = TrainConfig(**{**FAST, **options})
    full = train(tiny_llama, polarity_task(), config, tmp_path / "full", show_progress=False)
    part = tmp_path / "part"
    train(tiny_llama, polarity_task(), config, part, show_progress=False, stop_after=13)
    resumed = train(tiny_llama, polarity_task(), config, part, show_progress=False)
    np.testing.assert_array_equal(resumed.value, full.value)
    np.testing.assert_array_equal(resumed.key, full.key)
    assert resumed.history == full.history or [r["accuracy"] for r in resumed.history] == [
        r["accuracy"] for r in full.history]
    final = [load_file(str(run / "state.safetensors")) for run in (part, tmp_path / "full")]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:  # a decay goes on from step 13, not from the start
        np.testing.assert_array_equal(final[0][name], final[1][name])


def test_resume_point_is_written_between_rare_evaluations(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(spot.train, "CHECKPOINT_EVERY", 5)
    config = TrainConfig(**{**FAST, "steps": 20, "key_step": 3, "eval_every": 20})
    full = train(tiny_llama, polarity_task(), config, tmp_path / "full", show_progress=False)
    part = tmp_path / "part"
    train(tiny_llama, polarity_task(), config, part, show_progress=False, stop_after=13)
    with safe_open(str(part / "state.safetensors"), "np") as state:
        assert state.metadata()["step"] == "10"  # not the key step's 3
    resumed = train(tiny_llama, polarity_task(), config, part, show_progress=False)
    np.testing.assert_array_equal(resumed.value, full.value)
    assert [r["accuracy"] for r in resumed.history] == [r["accuracy"] for r in full.history]
    final = [load_file(str(run / "state.safetensors")) for run in (part, tmp_path / "full")]
    for name in final[0]:
        np.testing.assert_array_equal(final[0][name], final[1][name])


def test_learning_rate_schedules():
    linear, cosine = (learning_rate_schedule(0.3, name, 24) for name in ("linear", "cosine"))
    np.testing.assert_allclose([linear(0), linear(12), linear(24)], [0.3, 0.15, 0.0], atol=1e-7)
    np.testing.assert_allclose([cosine(0), cosine(12), cosine(24)], [0.3, 0.15, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="unknown schedule"):
        TrainConfig(**{**FAST, "schedule": "step"})


def test_decay_reaches_the_optimizer(tiny_llama, tmp_path):
    short = {**FAST, "steps": 8, "key_step": 8, "eval_every": 8}
    keys = [train(tiny_llama, polarity_task(), TrainConfig(**short, schedule=name),
                  tmp_path / name, show_progress=False).key for name in ("constant", "linear")]
    assert not np.array_equal(*keys)


def test_config_mismatch_and_file(tmp_path, tiny_llama):
    train(tiny_llama, polarity_task(), TrainConfig(**{**FAST, "steps": 8}), tmp_path,
          show_progress=False)
    with pytest.raises(ValueError, match="another config"):
        train(tiny_llama, polarity_task(), TrainConfig(**{**FAST, "steps": 16}), tmp_path,
              show_progress=False)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"task": "sst2", "steps": 10, "key_step": 5, "wat": 1}))
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.build(path)
    path.write_text(json.dumps({"task": "sst2", "steps": 10, "key_step": 5}))
    assert TrainConfig.build(path, seed=3).seed == 3
    with pytest.raises(ValueError, match="key_step"):
        TrainConfig(task="x", steps=5, key_step=9)


def _nan_grad_fn(params):
    return lambda prompt, batch: (jnp.nan * jnp.sum(prompt), prompt)


@pytest.mark.parametrize("path", ["one program", "layer by layer"])
def test_nan_loss_keeps_last_checkpoint(tiny_llama, tmp_path, path):
    config = TrainConfig(**FAST)
    train(tiny_llama, polarity_task(), config, tmp_path, show_progress=False, stop_after=8)
    saved, _ = load_prompt(tmp_path / "value.safetensors")
    if path == "one program":
        broken = dataclasses.replace(tiny_llama, loss_fn=lambda p, x, b, r: jnp.nan * jnp.sum(x),
                                     prompt_grad_fn=None)
    else:
        broken = dataclasses.replace(tiny_llama, prompt_grad_fn=_nan_grad_fn)
    with pytest.raises(TrainingError, match="last good checkpoint"):
        train(broken, polarity_task(), config, tmp_path, show_progress=False)
    again, _ = load_prompt(tmp_path / "value.safetensors")
    np.testing.assert_array_equal(saved, again)


def test_prompt_from_another_backbone_is_refused(tiny_llama, tmp_path):
    from conftest import make_tiny_llama

    other = make_tiny_llama(seed=5)
    train(other, polarity_task(), TrainConfig(**{**FAST, "steps": 8}), tmp_path / "a",
          show_progress=False)
    init = f"file:{tmp_path / 'a' / 'value.safetensors'}"
    with pytest.raises(BackboneError, match="trained on backbone"):
        train(tiny_llama, polarity_task(), TrainConfig(**{**FAST, "init": init}), tmp_path / "b",
              show_progress=False)


def test_a_training_split_with_one_label_is_refused(tiny_llama, tmp_path):
    """FewGLUE's wsc train rows all had label 1: tuning on them only teaches that answer."""
    data = polarity_task().load_all()
    one = [row for row in data["train"] if row.label == 1]
    task = Task("one_label", "sentiment", 2, ("accuracy",), lambda: {**data, "train": one})
    with pytest.raises(ValueError, match=f"all {len(one)} training rows answer '{one[0].choices[1]}'"):
        train(tiny_llama, task, TrainConfig(**{**FAST, "task": "one_label"}), tmp_path / "a",
              show_progress=False)
    assert not (tmp_path / "a" / "value.safetensors").exists()


SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    sys.path[:0] = [{root!r}, {tests!r}]
    from conftest import make_tiny_llama
    from tiny_tasks import polarity_task
    from spot.train import TrainConfig, train
    config = TrainConfig(**{config!r})
    result = train(make_tiny_llama(), polarity_task(), config, sys.argv[1], show_progress=False)
    np.save(sys.argv[2], result.value)
""")


def _script(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run_train.py"
    path.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), config=config))
    return path


def test_resume_after_kill(tmp_path, tiny_llama):
    """SIGKILL a training process mid-run; resuming its folder gives the uninterrupted result."""
    config = {**FAST, "steps": 32, "eval_every": 4}
    script = _script(tmp_path, config)
    run = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(script), str(run), str(tmp_path / "k.npy")])
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    cfg = TrainConfig(**config)
    resumed = train(tiny_llama, polarity_task(), cfg, run, show_progress=False)
    assert resumed.history[0]["step"] == 4  # the killed process's log was kept, not redone
    clean = train(tiny_llama, polarity_task(), cfg, tmp_path / "clean", show_progress=False)
    np.testing.assert_array_equal(resumed.value, clean.value)
    np.testing.assert_array_equal(resumed.key, clean.key)
    assert resumed.value_step == clean.value_step
    drop_rate = [{k: v for k, v in r.items() if k != "examples_per_s"} for r in resumed.history]
    assert drop_rate == [{k: v for k, v in r.items() if k != "examples_per_s"} for r in clean.history]


def test_data_parallel_two_devices_equals_one(tmp_path):
    script = _script(tmp_path, {**FAST, "steps": 8})
    flags = os.environ["XLA_FLAGS"]
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2")
    subprocess.run([sys.executable, str(script), str(tmp_path / "two"), str(tmp_path / "two.npy")],
                   check=True, env=env)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1"
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(tmp_path / "one.npy")],
                   check=True, env=env)
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), atol=1e-5)


def test_layerwise_step_equals_the_one_program_step(tiny_llama):
    """The trainer's default step on Llama (prompt gradient layer by layer, `prompt_grad_fn`) and
    the jitted one-program step give the same prompts and optimizer state over a few steps."""
    from spot.train import data_mesh, make_train_step, optimizer_for

    one_program = dataclasses.replace(tiny_llama, prompt_grad_fn=None)
    optimizer = optimizer_for(TrainConfig(**FAST))
    examples = encode(tiny_llama, polarity_task().load("train"), max_length=32)
    ends = []
    for b in (tiny_llama, one_program):
        step_fn = make_train_step(b, optimizer, data_mesh())
        assert hasattr(step_fn, "lower") == (b.prompt_grad_fn is None)  # jitted: one program
        prompt = b.embedding_table[:4] + 0.0
        state = optimizer.init(prompt)
        for step in range(3):
            batch = make_batch(examples, list(range(8 * step, 8 * step + 8)), b.pad_id,
                               max_length=32, pack=step > 0)
            prompt, state, loss = step_fn(b.params, prompt, state, batch, None)
        ends.append((prompt, state, loss))
    for a, b in zip(*(jax.tree_util.tree_leaves(end) for end in ends), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_patience_stops_a_run_that_no_longer_improves_and_resume_agrees(tiny_llama, tmp_path):
    config = TrainConfig(task="tiny_polarity", prompt_length=4, batch_size=8, steps=40,
                         key_step=2, eval_every=2, eval_examples=16, max_length=32,
                         learning_rate=1e-9, patience=2)
    result = train(tiny_llama, polarity_task(), config, tmp_path / "run", show_progress=False)
    steps = [record["step"] for record in result.history]
    assert result.value_step == 2 and steps == [2, 4, 6]  # no gain at 4 or 6: stop
    again = train(tiny_llama, polarity_task(), config, tmp_path / "run", show_progress=False)
    assert [record["step"] for record in again.history] == steps  # resuming does not go on
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(task="t", patience=-1)


def test_backbone_recommendations_sit_between_the_defaults_and_the_given_values(tmp_path):
    assert TrainConfig(task="t").learning_rate == 0.3  # the reference's default
    smollm2 = TrainConfig.build(task="t", backbone="smollm2-135m")
    assert (smollm2.learning_rate, smollm2.schedule) == (0.01, "linear")
    t5 = TrainConfig.build(task="t", backbone=str(tmp_path / "t5-base"))  # a checkpoint dir
    assert (t5.learning_rate, t5.schedule) == (0.3, "constant")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"task": "t", "learning_rate": 0.05}))
    from_file = TrainConfig.build(path)
    assert (from_file.learning_rate, from_file.schedule) == (0.05, "linear")
    assert TrainConfig.build(path, learning_rate=0.2).learning_rate == 0.2


def test_a_run_recorded_with_retired_options_at_their_off_values_resumes(tiny_llama, tmp_path):
    config = TrainConfig(**{**FAST, "steps": 8})
    train(tiny_llama, polarity_task(), config, tmp_path, show_progress=False)
    path = tmp_path / "config.json"
    recorded = json.loads(path.read_text())
    path.write_text(json.dumps({**recorded, **spot.train.RETIRED_FIELDS}))
    train(tiny_llama, polarity_task(), config, tmp_path, show_progress=False)
    path.write_text(json.dumps({**recorded, "prompt_ema": 0.9}))
    with pytest.raises(ValueError, match="another config"):
        train(tiny_llama, polarity_task(), config, tmp_path, show_progress=False)
