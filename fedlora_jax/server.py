"""Server state and the jitted federated round.

One call of the round function: sample a cohort, gather its shards, run every client's local
update in parallel (vmap over the client axis, optionally mapped over chunks of clients),
aggregate all LoRA modules (one vmapped call per group of same-shape modules) and the head, and
return the new server state. Shapes are static, so it compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.client import LocalTrainer, local_update
from fedlora_jax.data.base import FederatedData
from fedlora_jax.methods import Method, weighted_mean
from fedlora_jax.params import TrainableLayout, factor_mask, leaf_bytes


class ServerState(NamedTuple):
    """Everything a run carries between rounds (a pytree).

    params: global trainable state (LoRA factors + head).
    frozen: frozen base state (changes only for methods that fold updates into it).
    round: the next round's index (int32 scalar).
    key: PRNG key, split every round.
    """

    params: Any
    frozen: Any
    round: jax.Array
    key: jax.Array


class ClientShards(NamedTuple):
    """Device copies of the client data: arrays [U, n_max, ...] and counts [U]."""

    arrays: dict
    num_examples: jax.Array


class RoundOutput(NamedTuple):
    """What a round reports. Arrays over the cohort have a leading [K] axis."""

    train_loss: jax.Array  # scalar, example-weighted over the cohort
    divergence: jax.Array  # [num_lora_modules] normalised aggregation error
    cohort: jax.Array  # [K] client ids
    client_params: Any  # trained client states, leaves [K, ...]


def init_server_state(params, frozen, seed: int) -> ServerState:
    return ServerState(params, frozen, jnp.zeros((), jnp.int32), jax.random.key(seed))


def device_shards(data: FederatedData) -> ClientShards:
    return ClientShards({k: jnp.asarray(v) for k, v in data.train.items()}, jnp.asarray(data.num_train))


@dataclasses.dataclass(frozen=True)
class Federation:
    """Static description of a federated run (closed over by the jitted round)."""

    trainer: LocalTrainer
    method: Method
    layout: TrainableLayout
    cohort_size: int
    num_clients: int
    clients_per_chunk: int | None = None
    lora_scaling: float = 1.0

    def run_clients(self, frozen, start_params, shards: dict, counts, keys, round_index, train_mask):
        """Local updates of K clients: vmapped, or mapped over chunks of ``clients_per_chunk``.

        ``start_params``/``shards``/``counts``/``keys`` carry a leading [K] axis; ``frozen`` does not.
        """

        def one(args):
            params, data, n, key = args
            return local_update(self.trainer, frozen, params, data, n, key, round_index, train_mask)

        args = (start_params, shards, counts, keys)
        chunk = self.clients_per_chunk
        if chunk is None or chunk >= self.cohort_size:
            return jax.vmap(one)(args)
        return jax.lax.map(one, args, batch_size=chunk)

    def aggregate(self, client_params, weights, round_index):
        """New global trainable state from the cohort's states [K, ...], plus per-module divergence."""
        leaves, treedef = jax.tree.flatten(client_params)
        new = [None] * len(leaves)
        divergence = [None] * len(self.layout.modules)
        position = {m.name: i for i, m in enumerate(self.layout.modules)}
        for group in self.layout.shape_groups():
            b = jnp.stack([leaves[m.b_index] for m in group])  # [M, K, d_out, r]
            a = jnp.stack([leaves[m.a_index] for m in group])  # [M, K, r, d_in]
            out = jax.vmap(self.method.aggregate_fn, in_axes=(0, 0, None, None))(b, a, weights, round_index)
            div = jax.vmap(aggregation.divergence, in_axes=(0, 0, None, 0, 0))(b, a, weights, out.b, out.a)
            for i, m in enumerate(group):
                new[m.b_index], new[m.a_index] = out.b[i], out.a[i]
                divergence[position[m.name]] = div[i]
        for i in self.layout.other_indices:
            new[i] = weighted_mean(leaves[i], weights)
        return jax.tree.unflatten(treedef, new), jnp.stack(divergence)

    def round(self, state: ServerState, shards: ClientShards) -> tuple[ServerState, RoundOutput]:
        """One federated round (pure; jit it with :meth:`compile_round`)."""
        key, cohort_key, train_key = jax.random.split(state.key, 3)
        cohort = jax.random.choice(cohort_key, self.num_clients, (self.cohort_size,), replace=False)
        data = jax.tree.map(lambda x: x[cohort], shards.arrays)
        counts = shards.num_examples[cohort]
        weights = counts.astype(jnp.float32) / jnp.sum(counts)
        start = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.cohort_size,) + x.shape), state.params)
        train_a, train_b = self.method.trains(state.round)
        mask = factor_mask(self.layout, state.params, train_a, train_b)
        keys = jax.random.split(train_key, self.cohort_size)
        client_params, losses = self.run_clients(state.frozen, start, data, counts, keys, state.round, mask)
        params, divergence = self.aggregate(client_params, weights, state.round)
        new_state = ServerState(params, state.frozen, state.round + 1, key)
        return new_state, RoundOutput(jnp.sum(weights * losses), divergence, cohort, client_params)

    def compile_round(self):
        """The jitted round; the server state's buffers are donated."""
        return jax.jit(self.round, donate_argnums=0)

    def communication_bytes(self, params, round_index: int) -> tuple[int, int]:
        """Exact (bytes_up, bytes_down) of one round over the whole cohort."""
        sizes = leaf_bytes(params)
        head = int(sum(sizes[i] for i in self.layout.other_indices))
        up_a, up_b = self.method.uploads(round_index)
        down_a, down_b = self.method.downloads(round_index)

        def lora(send_a, send_b):
            return int(sum(sizes[m.a_index] * send_a + sizes[m.b_index] * send_b for m in self.layout.modules))

        return self.cohort_size * (lora(up_a, up_b) + head), self.cohort_size * (lora(down_a, down_b) + head)

