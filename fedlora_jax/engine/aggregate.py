"""The server's reduction of the cohort's uploads: per-module aggregates, the head's mean, the
frozen base's updates and the per-module divergence.

Streaming methods define one reduction (``summarise`` per chunk, summed; ``finalise`` once); a
round that holds the stacked uploads runs it as one chunk. Other methods aggregate the stacked
factors of each group of same-shape modules in one mapped call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods import Method
from fedlora_jax.methods.base import ideal_update
from fedlora_jax.params import TrainableLayout
from fedlora_jax.privacy import noisy_mean_of_updates
from fedlora_jax.engine.cohort import normalised_weights


@dataclasses.dataclass(frozen=True)
class BaseFolding:
    """Where a method's base updates go: each LoRA module's frozen kernel [d_in, d_out] (its index
    among the frozen leaves) and the LoRA scaling alpha / r they are multiplied by."""

    kernels: tuple[int, ...] = ()
    scaling: float = 1.0

    def fold(self, frozen_leaves: list, module_position: int, base_delta) -> None:
        """Adds ``scaling * base_delta`` [d_out, d_in] to the module's frozen kernel (in place of the list)."""
        j = self.kernels[module_position]
        kernel = frozen_leaves[j]
        frozen_leaves[j] = (kernel + self.scaling * base_delta.T).astype(kernel.dtype)


def map_modules(fn, xs):
    """Applies ``fn`` to every module of a same-shape group (leading axis of ``xs``).

    One vmapped call on accelerators. On the CPU backend the modules are mapped one at a time
    (``lax.map``): jaxlib's batched CPU LAPACK kernels (e.g. the Q of a QR, used by FRA) fan a
    batch out over the intra-op thread pool and block a worker while waiting, and two such calls
    running concurrently deadlock a small pool (seen with 12 modules on 2 cores). Unbatched
    calls do not fan out.
    """
    if jax.default_backend() == "cpu":
        return jax.lax.map(fn, xs)
    return jax.vmap(fn)(xs)


def module_keys(layout: TrainableLayout, key) -> dict:
    """Each LoRA module's server PRNG key (by module name), the same in stacked and streamed rounds."""
    position = {m.name: i for i, m in enumerate(layout.modules)}
    keys = {}
    for group in layout.shape_groups():
        split = jax.random.split(jax.random.fold_in(key, position[group[0].name]), len(group))
        keys.update({m.name: split[i] for i, m in enumerate(group)})
    return keys


def summarise_chunk(method: Method, layout: TrainableLayout, trained, w):
    """A chunk's additive totals from its clients' trained states (leaves [C, ...]) and round weights
    w [C]: (per-module method summaries, per-module ideal updates M = sum w B A [d_out, d_in] in
    float32, the weighted heads)."""
    leaves = jax.tree.leaves(trained)
    return (
        [method.summarise(leaves[m.b_index], leaves[m.a_index], w) for m in layout.modules],
        [ideal_update(leaves[m.b_index], leaves[m.a_index], w) for m in layout.modules],
        [aggregation.weighted_mean(leaves[i], w) for i in layout.other_indices],
    )


def finalise(method: Method, layout: TrainableLayout, folding: BaseFolding, totals, params_before, frozen,
             round_index, key):
    """(new global params, frozen, divergence [modules]) from the cohort's summed totals
    (:func:`summarise_chunk`) and the global state the clients started from."""
    leaves_before, treedef = jax.tree.flatten(params_before)
    summaries, ideals, heads = totals
    new = list(leaves_before)
    frozen_leaves, frozen_def = jax.tree.flatten(frozen)
    keys = module_keys(layout, key)
    divergence = []
    for position, (m, summary, ideal) in enumerate(zip(layout.modules, summaries, ideals)):
        out = method.finalise(summary, ideal, leaves_before[m.b_index], leaves_before[m.a_index], round_index,
                              keys[m.name])
        new[m.b_index], new[m.a_index] = out.b, out.a
        divergence.append(method.streamed_divergence(ideal, out))
        if out.base_delta is not None:
            folding.fold(frozen_leaves, position, out.base_delta)
    for i, head in zip(layout.other_indices, heads):
        new[i] = head.astype(leaves_before[i].dtype)
    return jax.tree.unflatten(treedef, new), jax.tree.unflatten(frozen_def, frozen_leaves), jnp.stack(divergence)


def aggregate_stacked(method: Method, layout: TrainableLayout, folding: BaseFolding, client_params, weights,
                      round_index, key, frozen, params_before=None):
    """(new global params, frozen, divergence [modules]) from the cohort's stacked states [K, ...].

    A streaming method runs its reduction as one chunk (``params_before``, the global state the
    clients started from, defaults to slot 0's state, which equals it in every factor the method
    leaves untrained). Other methods aggregate each group of same-shape modules in one mapped call.
    """
    if method.streaming:
        before = jax.tree.map(lambda x: x[0], client_params) if params_before is None else params_before
        totals = summarise_chunk(method, layout, client_params, weights)
        return finalise(method, layout, folding, totals, before, frozen, round_index, key)
    leaves, treedef = jax.tree.flatten(client_params)
    frozen_leaves, frozen_def = jax.tree.flatten(frozen)
    new = [None] * len(leaves)
    divergence = [None] * len(layout.modules)
    position = {m.name: i for i, m in enumerate(layout.modules)}
    keys = module_keys(layout, key)
    for group in layout.shape_groups():
        b = jnp.stack([leaves[m.b_index] for m in group])  # [M, K, d_out, r]
        a = jnp.stack([leaves[m.a_index] for m in group])  # [M, K, r, d_in]
        group_keys = jnp.stack([keys[m.name] for m in group])

        def module_update(x):
            out = method.aggregate(x[0], x[1], weights, round_index, x[2])
            return out, method.divergence(x[0], x[1], weights, out)

        out, div = map_modules(module_update, (b, a, group_keys))
        for i, m in enumerate(group):
            new[m.b_index], new[m.a_index] = out.b[i], out.a[i]
            divergence[position[m.name]] = div[i]
            if out.base_delta is not None:
                folding.fold(frozen_leaves, position[m.name], out.base_delta[i])
    for i in layout.other_indices:
        new[i] = aggregation.weighted_mean(leaves[i], weights).astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, new), jax.tree.unflatten(frozen_def, frozen_leaves), jnp.stack(divergence)


@dataclasses.dataclass(frozen=True)
class UserDP:
    """User-level DP-FedAvg at the server: clip each client's update to ``clip_norm``, add
    Gaussian noise ``noise_multiplier * clip_norm`` once to the sum, divide by the cohort size."""

    clip_norm: float
    noise_multiplier: float

    def mean(self, layout: TrainableLayout, global_params, client_params, taking_part, trained, key,
             expected_clients: float):
        """(global + noisy mean of the clipped updates of the clients taking part ([K] 0/1) over
        ``expected_clients``, divergence [modules]). Only what clients train (and upload) moves
        and gets noise: ``trained`` is the factor mask (FFA-LoRA's A stays bit-identical)."""
        deltas = jax.tree.map(lambda c, g: c - g[None], client_params, global_params)
        uniform = taking_part.astype(jnp.float32)
        mean_delta = noisy_mean_of_updates(deltas, uniform, self.clip_norm, self.noise_multiplier, key,
                                           expected_clients=expected_clients, noise_mask=trained)
        params = jax.tree.map(lambda g, d: g + d.astype(g.dtype), global_params, mean_delta)
        leaves, b_a = jax.tree.leaves(client_params), jax.tree.leaves(params)
        weights = normalised_weights(uniform)
        divergence = jnp.stack([aggregation.divergence(leaves[m.b_index], leaves[m.a_index], weights,
                                                       b_a[m.b_index], b_a[m.a_index]) for m in layout.modules])
        return params, divergence
