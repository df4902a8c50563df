"""Task embeddings (SPoT keys) made the one way a library's key protocol says.

Every task starts from the protocol's shared start prompt, so two keys differ only by what
their tasks' training rows do to it:
- `gradient_key`: the mean prompt gradient of the training loss at the start (no step);
- `trained_key`: the prompt after `steps` optimizer steps from the start (SPoT's keys).
Both are deterministic for a given task, backbone and protocol.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from library.protocol import KeyProtocol, start_sha256
from spot.backbones.base import Backbone
from spot.batching import Encoded, encode, make_batch, train_rows
from spot.progress import progress_bar
from spot.prompts import sampled_vocab
from spot.tasks import Task
from spot.train import choice_loss, data_mesh, make_optimizer, make_train_step

# The defaults of a new library's protocols (the study in studies/task_embeddings chose them).
DEFAULT_RECIPE = "gradient"
GRADIENT_OBJECTIVE = "choices"
PROMPT_LENGTH = 20
GRADIENT_EXAMPLES = 64
TRAINED_STEPS = 50
TRAINED_LEARNING_RATE = 0.01  # SmolLM2's working range (the T5 reference 0.3 blows prompts up)
BATCH_SIZE = 8
MAX_LENGTH = 128


def shared_start(backbone: Backbone, prompt_length: int = PROMPT_LENGTH, seed: int = 0) -> np.ndarray:
    """The start prompt every key of a protocol begins from: a sampled-vocabulary init."""
    return sampled_vocab(backbone, prompt_length, seed)


def default_protocol(
    backbone: Backbone, recipe: str = DEFAULT_RECIPE, prompt_length: int = PROMPT_LENGTH,
    seed: int = 0, objective: str | None = None,
) -> tuple[KeyProtocol, np.ndarray]:
    """A new library's protocol for `recipe` on `backbone`, with its start prompt. Trained keys
    use the LM objective (as source training does), gradient keys `GRADIENT_OBJECTIVE`."""
    start = shared_start(backbone, prompt_length, seed)
    trained = recipe == "trained"
    protocol = KeyProtocol(
        recipe=recipe, backbone=backbone.identity, start=start_sha256(start, backbone.identity),
        prompt_length=prompt_length, steps=TRAINED_STEPS if trained else 0,
        learning_rate=TRAINED_LEARNING_RATE if trained else 0.0,
        optimizer="adafactor" if trained else "none",
        objective=objective or ("lm" if trained else GRADIENT_OBJECTIVE), batch_size=BATCH_SIZE,
        examples=TRAINED_STEPS * BATCH_SIZE if trained else GRADIENT_EXAMPLES,
        max_length=MAX_LENGTH, seed=seed,
    )
    return protocol, start


def check_protocol(backbone: Backbone, protocol: KeyProtocol, start: np.ndarray) -> None:
    """Refuse a protocol made for another backbone, or a start that is not its start."""
    if protocol.backbone != backbone.identity:
        raise ValueError(
            f"the key protocol is for backbone {protocol.backbone}, not {backbone.identity} "
            f"({backbone.name})"
        )
    if start_sha256(start, backbone.identity) != protocol.start:
        raise ValueError(f"this start prompt is not protocol {protocol.id}'s")


def _encoded(backbone: Backbone, task: Task, protocol: KeyProtocol) -> Encoded:
    examples = task.load("train")
    if not examples:
        raise ValueError(f"task {task.name}: empty train split")
    return encode(backbone, examples, max_length=protocol.max_length)


def _pack(backbone: Backbone) -> bool:
    return backbone.packing and data_mesh().size == 1  # as in training


def gradient_key(
    backbone: Backbone, task: Task, protocol: KeyProtocol, start: np.ndarray
) -> np.ndarray:
    """Mean d loss / d prompt at `start` over `protocol.examples` training rows. [L, d]"""
    encoded = _encoded(backbone, task, protocol)
    n = min(protocol.examples, len(encoded))
    rows = np.sort(np.random.default_rng(protocol.seed).permutation(len(encoded))[:n])
    prompt = jnp.asarray(start)
    grad_fn = _prompt_grad(backbone, protocol.objective)
    total = np.zeros(start.shape, np.float64)
    for i in range(0, n, protocol.batch_size):
        chunk = rows[i : i + protocol.batch_size]
        # never packed: at most max_length / 16 padded shapes, each compiled once (and cached
        # across processes), where packed streams compile per (stream size, window)
        batch = make_batch(encoded, chunk, backbone.pad_id, max_length=protocol.max_length,
                           batch_size=protocol.batch_size)
        _, grad = grad_fn(prompt, jax.tree_util.tree_map(jnp.asarray, batch))
        total += np.asarray(grad, np.float64) * len(chunk)  # the loss is a mean over the batch
    return (total / n).astype(np.float32)


def _prompt_grad(backbone: Backbone, objective: str):
    """prompt, batch -> (loss, d loss / d prompt) of the deterministic `objective`."""
    if objective == "lm" and backbone.prompt_grad is not None:
        return backbone.prompt_grad  # layer by layer: faster where the backbone has it
    loss_fn = choice_loss(backbone.score_fn) if objective == "choices" else backbone.loss_fn
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=1))
    return lambda prompt, batch: value_and_grad(backbone.params, prompt, batch, None)


def trained_key(
    backbone: Backbone, task: Task, protocol: KeyProtocol, start: np.ndarray,
    show_progress: bool = False,
) -> np.ndarray:
    """The prompt after `protocol.steps` steps of prompt tuning from `start`. [L, d]"""
    encoded = _encoded(backbone, task, protocol)
    optimizer = make_optimizer(protocol.optimizer, protocol.learning_rate, 0.8, 1e-5,
                               "constant", protocol.steps)
    step_fn = make_train_step(backbone, optimizer, data_mesh(), protocol.objective)
    prompt = jnp.asarray(start)
    opt_state = optimizer.init(prompt)
    base_key = jax.random.PRNGKey(protocol.seed)
    with progress_bar(f"key {task.name}", total=protocol.steps, enabled=show_progress) as bar:
        for step in range(protocol.steps):
            rows = train_rows(len(encoded), protocol.batch_size, step, protocol.seed)
            batch = make_batch(encoded, rows, backbone.pad_id, max_length=protocol.max_length,
                               batch_size=protocol.batch_size, pack=_pack(backbone))
            prompt, opt_state, loss = step_fn(backbone.params, prompt, opt_state, batch,
                                              jax.random.fold_in(base_key, step))
            bar.update(step + 1, loss=float(loss))
    return np.asarray(prompt, np.float32)


def embed_task(
    backbone: Backbone, task: Task, protocol: KeyProtocol, start: np.ndarray,
    show_progress: bool = False,
) -> np.ndarray:
    """The task's key under `protocol` (checked against the backbone and start). [L, d]"""
    check_protocol(backbone, protocol, start)
    if protocol.recipe == "gradient":
        return gradient_key(backbone, task, protocol, start)
    return trained_key(backbone, task, protocol, start, show_progress)


def key_metadata(protocol: KeyProtocol, task: Task) -> dict[str, str]:
    """Metadata of a key file made by `protocol` (the library checks the protocol on publish)."""
    return {"backbone": protocol.backbone, "task": task.name, "role": "key",
            "step": str(protocol.steps), "seed": str(protocol.seed),
            "init": f"protocol:{protocol.id}", "protocol": protocol.to_json()}

