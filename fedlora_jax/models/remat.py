"""Rematerialisation (gradient checkpointing) of transformer layers.

With ``remat: layer`` (:func:`set_remat`) a model keeps only each layer's input for the backward
pass and recomputes the layer's activations there, trading one more forward pass of the layers
for their activation memory. The gradients are the same computation, so they equal the plain
model's (tested).

The recomputation is explicit (a ``custom_vjp`` whose backward rule re-runs the layer under
``jax.vjp``) and tied to the gradient arriving at the layer's output by a data dependency. With
``jax.checkpoint`` alone XLA's CPU scheduler hoisted every layer's recomputation to the start of
the backward pass, which keeps all the activations alive again (8 layers of a 2048 x 256 MLP:
180 MB of temporaries plain, 164 MB with ``jax.checkpoint``, 42 MB tied; an optimisation barrier
did not hold either).

A layer with book-keeping taps attached (:class:`fedlora_jax.models.lora.Tap`, DP-SGD's
per-example gradients) runs without rematerialisation: the taps record the layer's inputs for the
gradients, which are exactly the activations remat would drop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import custom_batching
from flax import nnx

from fedlora_jax.models.lora import ClientRouting, route_clients
from fedlora_jax.models.quantize import QuantizedArray

REMAT_POLICIES = ("layer",)


def set_remat(model: nnx.Module, policy: str | None) -> None:
    """Sets the remat policy (one of :data:`REMAT_POLICIES`, or None) of every layer stack in
    ``model`` (the modules with a ``remat`` attribute)."""
    if policy is not None and policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; expected one of {REMAT_POLICIES} or None")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "remat"):
            module.remat = policy


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recomputed(fn, hidden: jax.Array, *rest):
    """``fn(hidden, *rest)``; its backward pass keeps only the inputs and re-runs ``fn``, starting
    once the gradient of the output exists."""
    return fn(hidden, *rest)


def _recomputed_fwd(fn, hidden, *rest):
    return fn(hidden, *rest), (hidden, rest)


def _recomputed_bwd(fn, saved, gradient):
    hidden, rest = saved
    # a zero that depends on the output's gradient: the recomputation cannot start before it
    tie = jax.tree.leaves(gradient)[0].reshape(-1)[0] * 0
    _, backward = jax.vjp(fn, hidden + tie.astype(hidden.dtype), *rest)
    return backward(gradient)


recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


@custom_batching.custom_vmap
def _zero_of(x: jax.Array) -> jax.Array:
    """A scalar zero computed from ``x``; unbatched under ``vmap`` (a zero of the whole batch)."""
    return x.reshape(-1)[0] * 0


@_zero_of.def_vmap
def _zero_of_batched(axis_size, in_batched, x):
    return x.reshape(-1)[0] * 0, False


def _tied(tree, hidden: jax.Array):
    """``tree``'s floating leaves plus a zero that depends on ``hidden``: what is computed from them
    (a quantized weight's dequantization) cannot be scheduled before the layer's input exists. The
    zero is unbatched over vmapped clients, so the shared weights stay shared."""
    tie = _zero_of(jax.lax.stop_gradient(hidden))
    floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)
    return jax.tree.map(lambda x: x + tie.astype(x.dtype) if floating(x) else x, tree)


def run_layer(layer: nnx.Module, policy: str | None, hidden: jax.Array, *args) -> jax.Array:
    """``layer(hidden, *args)``, rematerialised (:func:`recomputed`) when ``policy`` is set.

    The layer's state (frozen weights and LoRA factors) and ``args`` (masks, rotary tables,
    packing) are explicit inputs of the recomputed function, so their gradients flow. Per-client
    routing (:func:`fedlora_jax.models.lora.route_clients`) is carried across by its token-client
    ids. A quantized weight (:class:`fedlora_jax.models.quantize.QuantizedArray` leaves) is
    dequantized only once the layer's input exists (:func:`_tied`), so one layer's float weights
    are alive at a time rather than the whole base's.
    """
    modules = [m for _, m in nnx.iter_graph(layer) if isinstance(m, nnx.Module)]
    quantized = any(isinstance(v, QuantizedArray) for _, v in nnx.iter_graph(layer))
    if (policy is None and not quantized) or any("tap" in m.__dict__ for m in modules):
        return layer(hidden, *args)
    routing = next((m.__dict__["routing"] for m in modules if "routing" in m.__dict__), None)
    for m in modules:
        m.__dict__.pop("routing", None)
    graphdef, codes, state = nnx.split(layer, QuantizedArray, ...)
    clients = None if routing is None else routing.clients

    def apply(h, codes, state, args, token_clients):
        rebuilt = nnx.merge(graphdef, _tied(codes, h), state)
        if token_clients is not None:
            route_clients(rebuilt, ClientRouting(token_clients, clients))
        return rebuilt(h, *args)

    token_clients = None if routing is None else routing.token_clients
    if policy is None:
        out = apply(hidden, codes, state, args, token_clients)
    else:
        out = recomputed(apply, hidden, codes, state, args, token_clients)
    if routing is not None:
        route_clients(layer, routing)
    return out
