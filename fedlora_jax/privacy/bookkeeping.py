"""Per-example gradients of the trainable layers from one batched backward pass (book-keeping).

DP-SGD needs each example's gradient. Vmapping the backward over examples
(:func:`fedlora_jax.privacy.private_gradient`) runs the whole model once per example and cannot
share a packed stream between examples. Book-keeping (Bu et al., 2023) runs ONE forward and
backward pass over the batch (padded rows or a packed stream) and rebuilds the per-example
gradients of the trainable parameters from what every trainable layer saw:

* its input x_t (recorded by a :class:`fedlora_jax.models.lora.Tap`), and
* the gradient g_t at its output (the gradient with respect to a zero the tap adds there).

For a LoRA layer (delta = s (x A^T) B^T) example i's gradients are
``dB_i = s sum_{t in i} g_t (x_t A^T)^T`` [d_out, r] and ``dA_i = s sum_{t in i} (g_t B)^T x_t``
[r, d_in]; for a linear head on one row per example, ``dW_i = x_i^T g_i`` and ``db_i = g_i``. These
are exact because examples do not interact (their tokens attend only within their own segment),
so g_t of a token of example i is the gradient of example i's own loss. In a stream shared by C
clients (trainable leaves [C, ...]), example i's factors are those of its own client. Only the
small trainable factors get a per-example copy ([b, d_out, r], [b, r, d_in]); no per-example
activation or frozen-weight gradient is ever formed, so this scales to decoders where vmapped
per-example backward passes do not fit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.models.lora import Linear, LoRALinear, Tap, attach_tap
from fedlora_jax.params import leaf_names
from fedlora_jax.tasks import model_losses


def _tappable_layers(model) -> dict[str, nnx.Module]:
    return {".".join(map(str, path)): m for path, m in nnx.iter_graph(model) if isinstance(m, (LoRALinear, Linear))}


def _layer_leaves(name: str, layer) -> dict[str, str]:
    """Trainable leaf name -> the parameter it is, for one tappable layer."""
    if isinstance(layer, LoRALinear):
        return {f"{name}.lora_a": "lora_a", f"{name}.lora_b": "lora_b"}
    out = {f"{name}.kernel": "kernel"}
    if layer.bias is not None:
        out[f"{name}.bias"] = "bias"
    return out


def unsupported_leaves(graphdef, params, frozen) -> list[str]:
    """Trainable leaves that book-keeping cannot give per-example gradients for (host-side check)."""
    model = nnx.merge(graphdef, params, frozen)
    covered = set()
    for name, layer in _tappable_layers(model).items():
        covered.update(_layer_leaves(name, layer))
    return [n for n in leaf_names(params) if n not in covered]


def _example_rows(values: jax.Array, batch: dict, num_examples: int) -> jax.Array:
    """A layer's per-token values as [b, rows, d]: padded rows stay as they are; a packed
    stream [1, T, d] is gathered back into each example's tokens (zero beyond its length)."""
    packing = batch.get("packing")
    if packing is None or values.ndim == 2:  # padded rows [b, L, d], or one row per example [b, d]
        return values.reshape(num_examples, -1, values.shape[-1])
    index, real = packing.example_tokens()
    return jnp.where(real[..., None], values[0][index], 0.0)


def per_example_gradients(graphdef, params, frozen, batch: dict, example_mask: jax.Array, task: str):
    """Per-example losses and gradients of every trainable leaf, by book-keeping.

    Args:
      graphdef, params, frozen: the split model (``params`` are the trainable leaves; with a
        leading client axis [C, ...] when the stream is shared by C clients).
      batch: padded rows [b, L, ...] or a packed stream (:func:`fedlora_jax.data.packing.pack`).
      example_mask: [b], 1 for a real example; other rows get zero gradient.
      task: the task kind.

    Returns:
      (losses [b], gradients: a tree like ``params`` with a leading [b] axis on every leaf).
    """
    num_examples = example_mask.shape[0]
    packing = batch.get("packing")
    clients = 1 if packing is None else packing.clients

    def own_factor(factor: jax.Array) -> jax.Array:  # [b, ...]: each example's client's factor
        if clients == 1:
            return jnp.broadcast_to(factor, (num_examples,) + factor.shape)
        return jnp.repeat(factor, num_examples // clients, axis=0)

    def run(zeros):
        model = nnx.merge(graphdef, params, frozen)
        layers = _tappable_layers(model)
        taps = {name: Tap(None if zeros is None else zeros[name]) for name in layers}
        for name, layer in layers.items():
            attach_tap(layer, taps[name])
        losses = model_losses(model, batch, task)
        return losses, layers, taps

    def outputs():
        _, _, taps = run(None)
        return {name: tap.output for name, tap in taps.items() if tap.output is not None}

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(outputs))

    def total(zeros):
        losses, _, taps = run(zeros)
        inputs = {name: taps[name].input for name in zeros}
        return jnp.sum(losses * example_mask.astype(losses.dtype)), (losses, inputs)

    output_grads, (losses, inputs) = jax.grad(total, has_aux=True)(zeros)
    model = nnx.merge(graphdef, params, frozen)
    grads = {}
    for name, layer in _tappable_layers(model).items():
        if name not in inputs:
            continue
        x = _example_rows(inputs[name], batch, num_examples).astype(jnp.float32)
        g = _example_rows(output_grads[name], batch, num_examples).astype(jnp.float32)
        if isinstance(layer, LoRALinear):
            a, b = own_factor(layer.lora_a[...].astype(jnp.float32)), own_factor(layer.lora_b[...].astype(jnp.float32))
            grads[f"{name}.lora_b"] = layer.scaling * jnp.einsum("blo,blr->bor", g, jnp.einsum("bli,bri->blr", x, a))
            grads[f"{name}.lora_a"] = layer.scaling * jnp.einsum("blr,bli->bri", jnp.einsum("blo,bor->blr", g, b), x)
        else:
            grads[f"{name}.kernel"] = jnp.einsum("bli,blo->bio", x, g)
            if layer.bias is not None:
                grads[f"{name}.bias"] = jnp.sum(g, axis=1)
    leaves, treedef = jax.tree.flatten(params)
    missing = [n for n in leaf_names(params) if n not in grads]
    if missing:
        raise ValueError(f"book-keeping has no per-example gradient for trainable leaves {missing}")
    per_example = [grads[n].astype(p.dtype) for n, p in zip(leaf_names(params), leaves)]
    return losses, jax.tree.unflatten(treedef, per_example)
