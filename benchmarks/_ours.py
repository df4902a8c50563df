"""Our side of the benchmarks: a backbone with chosen fast-path options, a train-step runner and
a scoring runner (the jitted functions of spot.train / spot.backbones, state carried across calls)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spot.backbones import llama_fns, llama_grad
from spot.evaluation import reusable_prompt
from spot.train import TrainConfig, data_mesh, make_train_step, optimizer_for

DEFAULTS = TrainConfig(task="benchmark")  # the trainer's optimizer defaults


def with_paths(backbone, opts, layerwise: bool = True):
    """The backbone with loss/score built from fast-path options (`None`: the plain Flax path).
    Prefix states (the prompt run once per scored split) come with the shared prefix only. The
    train step takes its prompt gradient layer by layer (`llama_grad.make_prompt_grad`, the
    trainer's default) where `llama_grad.prompt_grad_factory` allows it, unless `layerwise` is
    False: otherwise it is one jitted program."""
    shared = opts is not None and opts.share_prefix
    config, bos = backbone.config, backbone.bos_id
    return dataclasses.replace(
        backbone,
        loss_fn=llama_fns.make_loss_fn(config, bos, opts),
        score_fn=llama_fns.make_score_fn(config, bos, opts),
        prefix_fn=backbone.prefix_fn if shared else None,
        prompt_grad_fn=llama_grad.prompt_grad_factory(config, bos, opts) if layerwise else None,
    )


class OursTrain:
    """Runs our jitted train step (spot.train.make_train_step) over the batches, carrying state."""

    def __init__(self, backbone, prompt, batches):
        self.backbone, self.batches = backbone, [jax.device_put(b) for b in batches]
        self.optimizer = optimizer_for(DEFAULTS)
        self.step_fn = make_train_step(backbone, self.optimizer, data_mesh())
        self.prompt = jnp.array(prompt)  # a copy: the step donates its prompt buffer
        self.state = self.optimizer.init(self.prompt)
        self.rng = jax.random.PRNGKey(0)
        self.losses: list[float] = []

    def step(self, batch) -> float:
        self.prompt, self.state, loss = self.step_fn(
            self.backbone.params, self.prompt, self.state, batch, self.rng
        )
        jax.block_until_ready(self.prompt)  # the layer-by-layer step returns its loss earlier
        return float(loss)

    def __call__(self) -> None:
        self.losses = [self.step(b) for b in self.batches]


class OursScore:
    """Scores the batches as `spot.evaluation.score_encoded` scores a split (prefix states run
    once per call where the backbone has them)."""

    def __init__(self, backbone, prompt, batches):
        self.backbone, self.batches = backbone, [jax.device_put(b) for b in batches]
        self.prompt = jnp.asarray(prompt)

    def scoring_prompt(self):
        return reusable_prompt(self.backbone, self.prompt)

    def __call__(self) -> list[np.ndarray]:
        prompt = self.scoring_prompt()
        return [np.asarray(self.backbone.score(prompt, b)) for b in self.batches]


# ----------------------------------------------------------------------------- PEFT side
