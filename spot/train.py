"""Prompt tuning: only the prompt learns; the early checkpoint is the key, the best the value.

A run directory holds:
    config.json            the TrainConfig
    state.safetensors      the prompt + optimizer state + step + best score (resume point)
    key.safetensors        the prompt at `key_step` (task embedding for retrieval)
    value.safetensors      the best-validation prompt (transfer initialisation)
    metrics.jsonl          one line per evaluation
Batches and dropout keys are pure functions of (seed, step), so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from library.atomic import atomic_write
from spot.backbones import recommended_overrides
from spot.backbones.base import Backbone
from spot.batching import encode, make_batch, train_rows
from spot.evaluation import evaluate
from spot.progress import progress_bar
from spot.prompts import initial_prompt, load_for_backbone, save_for_backbone
from spot.tasks.splits import subset


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is kept."""


OPTIMIZERS = ("adafactor", "adam")
SCHEDULES = ("constant", "linear", "cosine")
# The resume point is also written every this many steps, so a run that evaluates rarely (a long
# source run with one evaluation at the end) loses at most these steps when it is interrupted.
CHECKPOINT_EVERY = 50
# Options removed after measuring no gain (studies/sst2_prompt_tuning/README.md), at the values
# that left them off: a run directory whose config.json records them so is the same run.
RETIRED_FIELDS = {"objective": "lm", "reparameterization": "none", "reparam_hidden": 256,
                  "reparam_lr_scale": 0.1, "prompt_ema": 0.0, "balance_classes": False}


def default_key_step(steps: int) -> int:
    """The key checkpoint when none is given: a sixth of the run (50 of 300 steps), at least 1."""
    return max(1, steps // 6)


def option(default: Any, help: str) -> Any:
    """A TrainConfig field with its help text (shown by the `spot` options made from it)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a prompt-tuning run, and the only home of their defaults (the reference's:
    T5X prompt tuning). `build` adds the backbone's recommended overrides and a config file."""

    task: str = option(dataclasses.MISSING, "registered task name (or a task file in `spot`)")
    backbone: str = option("smollm2-135m", "registered backbone name or checkpoint directory")
    prompt_length: int = option(20, "soft prompt tokens (L)")
    init: str = option("sampled_vocab", "start prompt: random_uniform | sampled_vocab | "
                       "class_labels | text:WORDS | file:PROMPT")
    optimizer: str = option("adafactor", "adafactor (T5X defaults) | adam")
    learning_rate: float = option(0.3, "peak learning rate")
    decay_rate: float = option(0.8, "Adafactor's second-moment decay")
    weight_decay: float = option(1e-5, "weight decay")
    batch_size: int = option(8, "training examples per step")
    steps: int = option(300, "training steps")
    key_step: int | None = option(None, "step of the key checkpoint (default: steps // 6, >= 1)")
    eval_every: int = option(50, "steps between validations (and after the last step)")
    eval_examples: int = option(400, "validation rows per evaluation (0: the whole split)")
    patience: int = option(0, "stop after this many evaluations without a better validation "
                           "score (0: never)")
    max_length: int = option(128, "longest input in tokens (longer inputs are cut)")
    seed: int = option(0, "seed of the init, batches and dropout")
    schedule: str = option("constant", "learning rate: constant | linear | cosine (decay to 0 "
                           "at the last step)")

    @classmethod
    def build(cls, file: str | Path | None = None, **given: Any) -> TrainConfig:
        """The defaults, then the backbone's recommended overrides, then the JSON config `file`,
        then `given` (None: not given). Unknown keys in the file are an error."""
        raw = json.loads(Path(file).read_text()) if file is not None else {}
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{file}: unknown config keys {sorted(unknown)}")
        chosen = {**raw, **{k: v for k, v in given.items() if v is not None}}
        backbone = chosen.get("backbone", cls.backbone)
        return cls(**{**recommended_overrides(backbone), **chosen})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "prompt_length", "eval_every", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.key_step is None:
            object.__setattr__(self, "key_step", default_key_step(self.steps))
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0: never stop early), got {self.patience}")
        if self.eval_examples < 0:
            raise ValueError(f"eval_examples must be >= 0 (0: the whole split), "
                             f"got {self.eval_examples}")
        if not 0 < self.key_step <= self.steps:
            raise ValueError(f"key_step {self.key_step} must lie in [1, steps={self.steps}]")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r} ({', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r} ({', '.join(SCHEDULES)})")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    out: Path
    value: np.ndarray
    value_score: float
    value_step: int
    key: np.ndarray
    metric: str
    history: list[dict[str, Any]]


def learning_rate_schedule(learning_rate: float, schedule: str, steps: int) -> optax.Schedule:
    """The step -> learning rate function: constant, or a linear or cosine decay to 0 at `steps`."""
    if schedule == "linear":
        return optax.linear_schedule(learning_rate, 0.0, steps)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, steps)
    return optax.constant_schedule(learning_rate)


@functools.lru_cache(maxsize=16)
def make_optimizer(
    name: str, learning_rate: float, decay_rate: float, weight_decay: float,
    schedule: str = "constant", steps: int = 1,
) -> optax.GradientTransformation:
    """Adafactor with the reference's defaults (constant lr, decay 0.8, no parameter scaling);
    `schedule` may decay the learning rate to 0 over `steps` instead."""
    lr = learning_rate_schedule(learning_rate, schedule, steps)
    if name == "adam":
        return optax.adamw(lr, weight_decay=weight_decay)
    return optax.adafactor(
        learning_rate=lr,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=False,
        weight_decay_rate=weight_decay,
    )


def optimizer_for(config: TrainConfig) -> optax.GradientTransformation:
    """The run's optimizer (cached: equal configs share one optimizer and one compiled step)."""
    return make_optimizer(config.optimizer, config.learning_rate, config.decay_rate,
                          config.weight_decay, config.schedule, config.steps)


@functools.lru_cache(maxsize=1)
def data_mesh() -> Mesh:
    """A 1-D mesh over every local device; batches are split along it."""
    return Mesh(np.asarray(jax.devices()), ("batch",))


def choice_loss(score_fn):
    """Rank-classification objective: cross-entropy of the gold choice under a softmax over the
    choices' log-likelihoods (what evaluation ranks). Deterministic: no dropout."""

    def loss_fn(params, prompt, batch, rng=None):
        log_probs = jax.nn.log_softmax(score_fn(params, prompt, batch), axis=-1)  # [batch, choices]
        gold = jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=1)[:, 0]
        real = (batch["choice_mask"].sum(axis=(1, 2)) > 0).astype(jnp.float32)  # not padding rows
        return -jnp.sum(gold * real) / jnp.maximum(jnp.sum(real), 1.0)

    return loss_fn


@functools.lru_cache(maxsize=16)
def make_train_step(
    backbone: Backbone, optimizer: optax.GradientTransformation, mesh: Mesh, objective: str = "lm"
):
    """Step: gradient w.r.t. the prompt only (the frozen params are a plain argument), of the
    `objective` "lm" (the gold answer's token cross-entropy) or "choices" (`choice_loss`, used by
    `spot.task_embedding`). One jitted program, or on one device with the LM objective and a backbone that
    has `prompt_grad_fn`, the gradient layer by layer (`_layerwise_step`). Cached, so runs on one
    backbone with one optimizer compile once per batch shape."""
    if objective == "lm" and mesh.size == 1 and backbone.prompt_grad_fn is not None:
        return _layerwise_step(backbone, optimizer)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("batch"))
    loss_fn = backbone.loss_fn if objective == "lm" else choice_loss(backbone.score_fn)

    def step(params, prompt, opt_state, batch, rng):
        loss, grad = jax.value_and_grad(loss_fn, argnums=1)(params, prompt, batch, rng)
        updates, opt_state = optimizer.update(grad, opt_state, prompt)
        return optax.apply_updates(prompt, updates), opt_state, loss

    return jax.jit(
        step,
        in_shardings=(replicated, replicated, replicated, sharded, replicated),
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(1, 2),
    )


def _layerwise_step(backbone: Backbone, optimizer: optax.GradientTransformation):
    """The same step with the prompt gradient from `backbone.prompt_grad` (layer by layer) and
    the optimizer's update jitted after it. Takes the backbone's own params only (its per-layer
    copy is made once)."""
    prompt_grad = backbone.prompt_grad

    @jax.jit
    def update(prompt, opt_state, grad):
        updates, opt_state = optimizer.update(grad, opt_state, prompt)
        return optax.apply_updates(prompt, updates), opt_state

    def step(params, prompt, opt_state, batch, rng):
        if params is not backbone.params:
            raise ValueError("the layer-by-layer step trains against its backbone's own params")
        loss, grad = prompt_grad(prompt, batch)
        return *update(prompt, opt_state, grad), loss

    return step


def _save_state(
    path: Path, prompt: jax.Array, opt_state, step: int, best: float, best_step: int
) -> None:
    leaves = jax.tree_util.tree_leaves(opt_state)
    tensors = {"prompt": np.asarray(prompt)}
    tensors |= {f"opt/{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    meta = {"step": str(step), "best": repr(best), "best_step": str(best_step)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    atomic_write(path, tmp.read_bytes())
    tmp.unlink()


def _load_state(path: Path, opt_template):
    """(prompt, optimizer state, step, best score, best step) of a resume point."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "np") as handle:
        meta = handle.metadata()
    template, treedef = jax.tree_util.tree_flatten(opt_template)
    leaves = [jnp.asarray(tensors[f"opt/{i}"], dtype=t.dtype) for i, t in enumerate(template)]
    opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
    return (jnp.asarray(tensors["prompt"]), opt_state, int(meta["step"]), float(meta["best"]),
            int(meta["best_step"]))


def _check_config(out: Path, config: TrainConfig) -> None:
    path = out / "config.json"
    wanted = dataclasses.asdict(config)
    if path.is_file():
        defaults = {f.name: f.default for f in dataclasses.fields(config)}  # fields added later
        recorded = json.loads(path.read_text())
        retired = {k for k, v in RETIRED_FIELDS.items() if recorded.get(k, v) == v}
        found = {**defaults, **{k: v for k, v in recorded.items() if k not in retired}}
        if found != wanted:
            changed = sorted(k for k in found | wanted if found.get(k) != wanted.get(k))
            raise ValueError(f"{out} holds a run with another config (differs in {changed})")
    else:
        atomic_write(path, json.dumps(wanted, indent=1).encode())


def train(
    backbone: Backbone, task, config: TrainConfig, out: str | Path, show_progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Tune a prompt on `task`; resumes from `out/state.safetensors` when present.

    `stop_after` ends the call after that many steps of this invocation (interruption tests).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config)
    train_examples = task.load("train")
    valid_examples = subset(task.load("validation"), config.eval_examples, seed=config.seed)
    if not train_examples or not valid_examples:
        raise ValueError(f"task {task.name}: empty train or validation split")
    if len(answers := {e.choices[e.label] for e in train_examples}) < 2:
        raise ValueError(f"task {task.name}: all {len(train_examples)} training rows answer "
                         f"{answers.pop()!r}; a prompt tuned on them learns to give that answer")
    encoded = encode(backbone, train_examples, max_length=config.max_length)
    metric = task.metrics[0]
    mesh = data_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {mesh.size} devices")
    optimizer = optimizer_for(config)
    step_fn = make_train_step(backbone, optimizer, mesh)
    pack = backbone.packing and mesh.size == 1  # a packed stream has no batch axis to split
    sharded = NamedSharding(mesh, PartitionSpec("batch"))

    initial = initial_prompt(
        backbone, config.init, config.prompt_length, config.seed, list(train_examples[0].choices)
    )
    prompt = jnp.asarray(initial)
    opt_state = optimizer.init(prompt)
    step, best, best_step = 0, -math.inf, 0
    state_path = out / "state.safetensors"
    if state_path.is_file():
        prompt, opt_state, step, best, best_step = _load_state(state_path, opt_state)
    history = _read_history(out, step)

    def validate(p) -> float:
        return evaluate(backbone, p, _Fixed(task, valid_examples), "validation",
                        max_length=config.max_length, show_progress=show_progress)[metric]

    base_key = jax.random.PRNGKey(config.seed)
    started, seen = time.perf_counter(), 0
    with progress_bar(f"train {task.name}", total=config.steps, completed=step,
                      enabled=show_progress) as bar:
        if history:  # resumed: show the last logged numbers until new ones arrive
            last = history[-1]
            bar.update(step, loss=last["loss"], score=last[metric], rate=last["examples_per_s"])
        while step < config.steps and not _stalled(config, step, best_step):
            if stop_after is not None and seen >= stop_after * config.batch_size:
                break
            rows = train_rows(len(encoded), config.batch_size, step, config.seed)
            batch = make_batch(encoded, rows, backbone.pad_id, max_length=config.max_length,
                               batch_size=config.batch_size, pack=pack)
            batch = jax.device_put(batch, sharded)
            rng = jax.random.fold_in(base_key, step)
            new_prompt, new_opt, loss = step_fn(backbone.params, prompt, opt_state, batch, rng)
            loss = float(loss)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss} at step {step + 1}; the last good checkpoint in {out} is kept"
                )
            prompt, opt_state, step = new_prompt, new_opt, step + 1
            seen += config.batch_size
            rate = seen / (time.perf_counter() - started)
            bar.update(step, loss=loss, rate=rate)
            if step == config.key_step:
                save_for_backbone(out / "key.safetensors", prompt, backbone,
                                  task=task.name, role="key", step=step, init=config.init,
                                  seed=config.seed)
            if step % config.eval_every == 0 or step == config.steps:
                score = validate(prompt)
                record = {"step": step, "loss": loss, metric: score, "examples_per_s": rate}
                history.append(record)
                bar.update(step, score=score)
                if score > best:
                    best, best_step = score, step
                    save_for_backbone(out / "value.safetensors", prompt, backbone,
                                      task=task.name, role="value", step=step, score=score,
                                      metric=metric, init=config.init, seed=config.seed)
                with open(out / "metrics.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
            if (step % config.eval_every == 0 or step % CHECKPOINT_EVERY == 0
                    or step in (config.key_step, config.steps)):
                _save_state(state_path, prompt, opt_state, step, best, best_step)
    value, _ = load_for_backbone(out / "value.safetensors", backbone) if best_step else (None, None)
    key, _ = load_for_backbone(out / "key.safetensors", backbone) if step >= config.key_step else (None, None)
    return TrainResult(out, value, best, best_step, key, metric, history)


def _stalled(config: TrainConfig, step: int, best_step: int) -> bool:
    """Validation has not improved for `patience` evaluations (a pure function of the resume
    point, so a resumed run stops where the uninterrupted one did)."""
    return config.patience > 0 and step - best_step >= config.patience * config.eval_every


def _read_history(out: Path, step: int) -> list[dict[str, Any]]:
    """Metrics logged up to the resume point; later lines (from an interrupted run) are dropped."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept


@dataclasses.dataclass(frozen=True)
class _Fixed:
    """A task view whose validation split is a fixed list (the evaluation subset)."""

    task: Any
    examples: list

    @property
    def name(self) -> str:
        return self.task.name

    def load(self, split: str) -> list:
        return self.examples

    def evaluate(self, predictions, labels) -> dict[str, float]:
        return self.task.evaluate(predictions, labels)
