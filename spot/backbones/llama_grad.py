"""Layer-streamed prompt gradient (training, one device).

`llama_fns.make_loss_fn`'s loss and its gradient w.r.t. the prompt as a Python loop of per-layer
jitted calls: the forward pass layer by layer, each call returning what its backward pass needs,
then the backward pass layer by layer. Against the one-program step (a `lax.scan` over the stacked
weights) no weight is sliced out of a stacked array and no activation is stacked into a
[layers, ...] buffer (16-17% of the step, see benchmarks/README.md), and what compiles per batch
shape is one layer, not the whole model. Weights are read in place: a layer's saved activations
never include its inputs (weights, hidden states, masks); the backward call takes those from the
caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spot.backbones.base import Batch, Params
from spot.backbones.llama import LlamaConfig
from spot.backbones.llama_fast import (
    FAST,
    FastOptions,
    Layout,
    fast_inputs,
    fast_outputs,
    layer_step,
)
from spot.backbones.llama_fns import gold_inputs, gold_loss, packing


def split_layers(params: Params) -> list:
    """The stacked layer weights [layers, ...] as one tree per layer (a copy, made once)."""
    stacked = jax.tree_util.tree_map(np.asarray, params["layers"])
    count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(a[i]), stacked) for i in range(count)]


def _signature(*args) -> tuple:
    """Tree structure, shapes and dtypes of `args`: what a jitted call is traced for."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((a.shape, jnp.dtype(a.dtype)) for a in leaves)


class _LayerCalls:
    """The jitted calls of the layer-streamed gradient for one (config, BOS, options)."""

    def __init__(self, config: LlamaConfig, bos_id: int | None, opts: FastOptions):
        self.config, self.bos_id, self.opts = config, bos_id, opts
        # per traced layer signature: (the backward closure's tree, where each of its leaves is
        # among the layer's inputs (index) or among the saved activations (-1))
        self.layouts: dict[tuple, tuple] = {}
        self.start = jax.jit(self._start)
        self.forward = jax.jit(self._forward)
        self.backward = jax.jit(self._backward, static_argnums=0)
        self.finish = jax.jit(self._finish)
        self.pull = jax.jit(lambda pullback, g: pullback(g)[0])

    def _start(self, params, prompt, batch):
        """-> (first layer's input, `Stream`, the input stage's backward closure)."""
        tokens, mask, gold, _ = gold_inputs(batch)
        k, t = gold.shape[1], tokens.shape[1]
        layout = Layout((t - k, t), *packing(batch))

        def inputs(prompt):
            carry, stream, _ = fast_inputs(self.config, params, prompt, tokens, mask, self.bos_id,
                                           layout, self.opts)
            return carry, stream

        carry, pullback, stream = jax.vjp(inputs, prompt, has_aux=True)
        return carry, stream, pullback

    def _forward(self, w, carry, stream):
        """One layer -> (its output, the activations its backward pass needs but the inputs)."""
        out, pullback = jax.vjp(lambda c: layer_step(self.config, w, c, stream), carry)
        leaves, tree = jax.tree_util.tree_flatten(pullback)
        inputs = jax.tree_util.tree_leaves((w, carry, stream))
        where = tuple(next((j for j, a in enumerate(inputs) if a is leaf), -1) for leaf in leaves)
        self.layouts[_signature(w, carry, stream)] = (tree, where)
        return out, [leaf for leaf, j in zip(leaves, where, strict=True) if j < 0]

    @staticmethod
    def _backward(layout, w, carry, stream, saved, grad):
        """Gradient w.r.t. a layer's input from the gradient w.r.t. its output."""
        tree, where = layout
        inputs, saved = jax.tree_util.tree_leaves((w, carry, stream)), iter(saved)
        leaves = [inputs[j] if j >= 0 else next(saved) for j in where]
        return jax.tree_util.tree_unflatten(tree, leaves)(grad)[0]

    def _finish(self, params, carry, stream, batch):
        """(loss, its gradient w.r.t. the last layer's output)."""
        _, _, gold, gold_mask = gold_inputs(batch)

        def loss(carry):
            states = fast_outputs(self.config, params, carry[1], stream)
            return gold_loss(self.config, params, states, gold, gold_mask)

        return jax.value_and_grad(loss)(carry)


@functools.lru_cache(maxsize=8)
def _layer_calls(config: LlamaConfig, bos_id: int | None, opts: FastOptions) -> _LayerCalls:
    return _LayerCalls(config, bos_id, opts)


def make_prompt_grad(config: LlamaConfig, bos_id: int | None, params: Params,
                     opts: FastOptions = FAST):
    """prompt_grad(prompt [L, C], batch) -> (loss, d loss / d prompt): `make_loss_fn`'s loss
    (deterministic) and its prompt gradient, computed layer by layer (see above). Keeps a
    per-layer copy of the weights of `params`. `prompt_grad_factory` says when it applies."""
    layers, calls = split_layers(params), _layer_calls(config, bos_id, opts)

    def prompt_grad(prompt: jax.Array, batch: Batch):
        carry, stream, start_pullback = calls.start(params, prompt, batch)
        saved = []
        for w in layers:
            out, activations = calls.forward(w, carry, stream)
            saved.append((w, carry, activations))
            carry = out
        layout = calls.layouts[_signature(layers[0], saved[0][1], stream)]
        loss, grad = calls.finish(params, carry, stream, batch)
        for w, layer_input, activations in reversed(saved):
            grad = calls.backward(layout, w, layer_input, stream, activations, grad)
        return loss, calls.pull(start_pullback, grad)

    return prompt_grad


def prompt_grad_factory(config: LlamaConfig, bos_id: int | None,
                        opts: FastOptions | None = FAST):
    """`Backbone.prompt_grad_fn` for these options: params -> `make_prompt_grad`'s function, or
    None where the layer-by-layer gradient does not apply: the plain path (`opts` None), dropout
    (the fast path is deterministic), and the scan-only option `unroll`."""
    unrolled = opts is not None and (opts.unroll is True or opts.unroll != 1)  # True == 1
    if opts is None or config.dropout_rate > 0 or unrolled:
        return None
    return functools.partial(make_prompt_grad, config, bos_id, opts=opts)
