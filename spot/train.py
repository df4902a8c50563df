"""Prompt tuning: only the prompt learns; the early checkpoint is the key, the best the value.

A run directory holds:
    config.json            the TrainConfig
    state.safetensors      trainable parameters (+ the prompt's EMA) + optimizer state + step +
                           best score (resume point)
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
from spot.backbones.base import Backbone
from spot.batching import balanced_train_rows, encode, make_batch, train_rows
from spot.evaluation import evaluate, subset
from spot.progress import progress_bar
from spot.prompts import initial_prompt, load_for_backbone, save_for_backbone
from spot.reparameterization import (
    REPARAMETERIZATIONS,
    Trainable,
    effective_prompt,
    group_labels,
    init_trainable,
)


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is kept."""


OBJECTIVES = ("lm", "choices")
SCHEDULES = ("constant", "linear", "cosine")
# The resume point is also written every this many steps, so a run that evaluates rarely (a long
# source run with one evaluation at the end) loses at most these steps when it is interrupted.
CHECKPOINT_EVERY = 50


def default_key_step(steps: int) -> int:
    """The key checkpoint when none is given: a sixth of the run (50 of 300 steps), at least 1."""
    return max(1, steps // 6)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    task: str
    backbone: str = "smollm2-135m"
    prompt_length: int = 20
    init: str = "sampled_vocab"  # random_uniform | sampled_vocab | class_labels | text:.. | file:..
    optimizer: str = "adafactor"  # adafactor (T5X defaults) | adam
    learning_rate: float = 0.3
    decay_rate: float = 0.8
    weight_decay: float = 1e-5
    batch_size: int = 8
    steps: int = 300
    key_step: int | None = None  # None: default_key_step(steps) (50 for the default 300 steps)
    eval_every: int = 50
    eval_examples: int = 400  # validation subset per evaluation (0 = whole split)
    patience: int = 0  # > 0: stop after this many evaluations without a better validation score
    max_length: int = 128
    seed: int = 0
    objective: str = "lm"  # lm: gold answer's token cross-entropy | choices: softmax over choices
    schedule: str = "constant"  # constant (the reference) | linear | cosine: decay to 0 at `steps`
    reparameterization: str = "none"  # none (the reference) | residual (see spot.reparameterization)
    reparam_hidden: int = 256  # the residual MLP's width
    reparam_lr_scale: float = 0.1  # the MLP's learning rate, relative to the prompt's
    prompt_ema: float = 0.0  # > 0: keys, values and evaluations use an EMA of the prompt
    balance_classes: bool = False  # batches take the classes in turn (see balanced_train_rows)

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
        if self.optimizer not in ("adafactor", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r} (adafactor, adam)")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r} ({', '.join(OBJECTIVES)})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r} ({', '.join(SCHEDULES)})")
        if self.reparameterization not in REPARAMETERIZATIONS:
            raise ValueError(f"unknown reparameterization {self.reparameterization!r} "
                             f"({', '.join(REPARAMETERIZATIONS)})")
        if self.reparam_hidden < 1 or not self.reparam_lr_scale > 0:
            raise ValueError("reparam_hidden and reparam_lr_scale must be positive")
        if not 0 <= self.prompt_ema < 1:
            raise ValueError(f"prompt_ema {self.prompt_ema} must lie in [0, 1)")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A JSON config file; keyword overrides win. Unknown keys are an error."""
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**{**raw, **{k: v for k, v in overrides.items() if v is not None}})


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


@functools.lru_cache(maxsize=16)
def _grouped(
    prompt: optax.GradientTransformation, reparam: optax.GradientTransformation
) -> optax.GradientTransformation:
    # Cached on the (cached) parts, so equal configs share one optimizer and one compiled step.
    return optax.multi_transform({"prompt": prompt, "reparam": reparam}, group_labels)


def optimizer_for(config: TrainConfig) -> optax.GradientTransformation:
    """The run's optimizer; a reparameterization's MLP learns at `reparam_lr_scale` x the rate."""

    def at(learning_rate: float) -> optax.GradientTransformation:
        return make_optimizer(config.optimizer, learning_rate, config.decay_rate,
                              config.weight_decay, config.schedule, config.steps)

    prompt = at(config.learning_rate)
    if config.reparameterization == "none":
        return prompt
    return _grouped(prompt, at(config.learning_rate * config.reparam_lr_scale))


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
    """Step: gradient w.r.t. the trainable prompt parameters only (the frozen params are a plain
    argument). One jitted program, or on one device with the LM objective and a backbone that
    has `prompt_grad_fn`, the gradient layer by layer (`_layerwise_step`). Cached, so runs on one
    backbone with one optimizer compile once per batch shape."""
    if objective == "lm" and mesh.size == 1 and backbone.prompt_grad_fn is not None:
        return _layerwise_step(backbone, optimizer)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("batch"))
    loss_fn = backbone.loss_fn if objective == "lm" else choice_loss(backbone.score_fn)

    def step(params, trainable, opt_state, batch, rng):
        def loss_of(t):
            return loss_fn(params, effective_prompt(t), batch, rng)

        loss, grad = jax.value_and_grad(loss_of)(trainable)
        updates, opt_state = optimizer.update(grad, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(
        step,
        in_shardings=(replicated, replicated, replicated, sharded, replicated),
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(1, 2),
    )


def _layerwise_step(backbone: Backbone, optimizer: optax.GradientTransformation):
    """The same step with the prompt gradient from `backbone.prompt_grad` (layer by layer): the
    reparameterization's and the optimizer's parts are jitted around it. Takes the backbone's
    own params only (its per-layer copy is made once)."""
    prompt_grad = backbone.prompt_grad

    @jax.jit
    def prompt_of(trainable):
        return jax.vjp(effective_prompt, trainable)

    @jax.jit
    def update(trainable, opt_state, pullback, prompt_gradient):
        (grad,) = pullback(prompt_gradient)
        updates, opt_state = optimizer.update(grad, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    def step(params, trainable, opt_state, batch, rng):
        if params is not backbone.params:
            raise ValueError("the layer-by-layer step trains against its backbone's own params")
        prompt, pullback = prompt_of(trainable)
        loss, prompt_gradient = prompt_grad(prompt, batch)
        return *update(trainable, opt_state, pullback, prompt_gradient), loss

    return step


def _trainable_tensors(trainable: Trainable) -> dict[str, np.ndarray]:
    """"prompt" (and "reparam/<name>" for a reparameterization's other parameters)."""
    if not isinstance(trainable, dict):
        return {"prompt": np.asarray(trainable)}
    return {k if k == "prompt" else f"reparam/{k}": np.asarray(v) for k, v in trainable.items()}


def _save_state(
    path: Path, trainable: Trainable, average: jax.Array | None, opt_state, step: int,
    best: float, best_step: int,
) -> None:
    leaves = jax.tree_util.tree_leaves(opt_state)
    tensors = _trainable_tensors(trainable)
    if average is not None:
        tensors["prompt_ema"] = np.asarray(average)
    tensors |= {f"opt/{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    meta = {"step": str(step), "best": repr(best), "best_step": str(best_step)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    atomic_write(path, tmp.read_bytes())
    tmp.unlink()


def _load_state(path: Path, trainable_template: Trainable, with_average: bool, opt_template):
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "np") as handle:
        meta = handle.metadata()
    loaded = {name: jnp.asarray(tensors[name]) for name in _trainable_tensors(trainable_template)}
    trainable = (
        {k.removeprefix("reparam/"): v for k, v in loaded.items()}
        if isinstance(trainable_template, dict) else loaded["prompt"]
    )
    template, treedef = jax.tree_util.tree_flatten(opt_template)
    leaves = [jnp.asarray(tensors[f"opt/{i}"], dtype=t.dtype) for i, t in enumerate(template)]
    opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
    return (
        trainable,
        jnp.asarray(tensors["prompt_ema"]) if with_average else None,
        opt_state,
        int(meta["step"]),
        float(meta["best"]),
        int(meta["best_step"]),
    )


def _check_config(out: Path, config: TrainConfig) -> None:
    path = out / "config.json"
    wanted = dataclasses.asdict(config)
    if path.is_file():
        defaults = {f.name: f.default for f in dataclasses.fields(config)}  # fields added later
        found = {**defaults, **json.loads(path.read_text())}
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
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
    encoded = encode(backbone, train_examples, max_length=config.max_length)
    metric = task.metrics[0]
    mesh = data_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {mesh.size} devices")
    optimizer = optimizer_for(config)
    step_fn = make_train_step(backbone, optimizer, mesh, config.objective)
    pack = backbone.packing and mesh.size == 1  # a packed stream has no batch axis to split
    sharded = NamedSharding(mesh, PartitionSpec("batch"))

    initial = initial_prompt(
        backbone, config.init, config.prompt_length, config.seed, list(train_examples[0].choices)
    )
    trainable = init_trainable(config.reparameterization, jnp.asarray(initial),
                               config.reparam_hidden, config.seed)
    opt_state = optimizer.init(trainable)
    # The prompt that is evaluated and saved: the current one, or an EMA starting at the initial.
    average = jnp.copy(effective_prompt(trainable)) if config.prompt_ema else None  # step donates
    step, best, best_step = 0, -math.inf, 0
    state_path = out / "state.safetensors"
    if state_path.is_file():
        trainable, average, opt_state, step, best, best_step = _load_state(
            state_path, trainable, average is not None, opt_state)
    history = _read_history(out, step)

    def validate(p) -> float:
        return evaluate(backbone, p, _Fixed(task, valid_examples), "validation",
                        max_length=config.max_length, show_progress=show_progress)[metric]

    def current() -> jax.Array:
        return effective_prompt(trainable) if average is None else average

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
            rows = (
                balanced_train_rows(encoded.labels, config.batch_size, step, config.seed)
                if config.balance_classes
                else train_rows(len(encoded), config.batch_size, step, config.seed)
            )
            batch = make_batch(encoded, rows, backbone.pad_id, max_length=config.max_length,
                               batch_size=config.batch_size, pack=pack)
            batch = jax.device_put(batch, sharded)
            rng = jax.random.fold_in(base_key, step)
            new_trainable, new_opt, loss = step_fn(backbone.params, trainable, opt_state, batch,
                                                   rng)
            loss = float(loss)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss} at step {step + 1}; the last good checkpoint in {out} is kept"
                )
            trainable, opt_state, step = new_trainable, new_opt, step + 1
            if average is not None:
                average = _ema_update(average, trainable, config.prompt_ema)
            seen += config.batch_size
            rate = seen / (time.perf_counter() - started)
            bar.update(step, loss=loss, rate=rate)
            if step == config.key_step:
                save_for_backbone(out / "key.safetensors", current(), backbone,
                                  task=task.name, role="key", step=step, init=config.init,
                                  seed=config.seed)
            if step % config.eval_every == 0 or step == config.steps:
                prompt = current()
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
                _save_state(state_path, trainable, average, opt_state, step, best, best_step)
    value, _ = load_for_backbone(out / "value.safetensors", backbone) if best_step else (None, None)
    key, _ = load_for_backbone(out / "key.safetensors", backbone) if step >= config.key_step else (None, None)
    return TrainResult(out, value, best, best_step, key, metric, history)


def _stalled(config: TrainConfig, step: int, best_step: int) -> bool:
    """Validation has not improved for `patience` evaluations (a pure function of the resume
    point, so a resumed run stops where the uninterrupted one did)."""
    return config.patience > 0 and step - best_step >= config.patience * config.eval_every


@jax.jit
def _ema_update(average: jax.Array, trainable: Trainable, decay: float) -> jax.Array:
    """One step of the prompt's EMA [L, d] (one dispatch, the reparameterization included)."""
    return decay * average + (1 - decay) * effective_prompt(trainable)


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
