"""Training-time reparameterisations of a prompt: the trainer learns their parameters, every
saved key and value is the `[L, d]` prompt they produce, so nothing downstream changes.

* `none`: the prompt itself is the trainable parameter (Lester et al. 2021; the reference).
* `residual`: a residual MLP shared by the prompt's tokens, after Residual Prompt Tuning
  (Razdaibiedina et al. 2023): `P + relu(P W1 + b1) W2 + b2`. Its output layer starts at zero,
  so training starts from the initial prompt; the paper's LayerNorm is left out (its output
  scale, ~1 per element, would swamp embeddings as small as SmolLM2's, std ~0.14).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

REPARAMETERIZATIONS = ("none", "residual")

Trainable = jax.Array | dict[str, jax.Array]  # the prompt, or {"prompt": P, "w1": .., ...}


def init_trainable(kind: str, prompt: jax.Array, hidden: int, seed: int) -> Trainable:
    """The trainable parameters for `kind`, producing `prompt` [L, d] before any update."""
    if kind == "none":
        return prompt
    if kind != "residual":
        raise ValueError(f"unknown reparameterization {kind!r} ({', '.join(REPARAMETERIZATIONS)})")
    d = prompt.shape[-1]
    w1 = jax.random.normal(jax.random.PRNGKey(seed), (d, hidden)) / math.sqrt(d)
    return {
        "prompt": prompt,
        "w1": w1.astype(prompt.dtype),  # [d, hidden]
        "b1": jnp.zeros(hidden, prompt.dtype),
        "w2": jnp.zeros((hidden, d), prompt.dtype),  # zero: the MLP adds nothing at first
        "b2": jnp.zeros(d, prompt.dtype),
    }


def effective_prompt(trainable: Trainable) -> jax.Array:
    """The prompt [L, d] the backbone sees."""
    if not isinstance(trainable, dict):
        return trainable
    p = trainable["prompt"]
    h = jax.nn.relu(p @ trainable["w1"] + trainable["b1"])  # [L, d] -> [L, hidden]
    return p + h @ trainable["w2"] + trainable["b2"]  # [L, hidden] -> [L, d]


def group_labels(trainable: dict[str, jax.Array]) -> dict[str, str]:
    """Optimizer group of each reparameterized parameter: "prompt" or "reparam" (the MLP)."""
    return {name: "prompt" if name == "prompt" else "reparam" for name in trainable}
