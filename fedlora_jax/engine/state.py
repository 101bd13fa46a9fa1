"""What a run carries between rounds, what a round reads, and what it reports (pytrees)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax.data.base import FederatedData


class ServerState(NamedTuple):
    """Everything a run carries between rounds (a pytree).

    params: global trainable state (LoRA factors + head).
    frozen: frozen base state (changes only for methods that fold updates into it).
    round: the next round's index (int32 scalar).
    key: PRNG key, split every round.
    method_state: what the method keeps at the server between rounds (a pytree; e.g. FedSA's
      per-client B banks [U, d_out, r]); () for most methods.
    optimizer_state: the server optimiser's state (FedAvgM's momentum, FedAdam's moments; the
      optax state of ``federation.server_optimizer``); () with plain averaging.
    """

    params: Any
    frozen: Any
    round: jax.Array
    key: jax.Array
    method_state: Any = ()
    optimizer_state: Any = ()


class ClientShards(NamedTuple):
    """Device copy of the client data: every client's rows once, client after client (arrays
    [N, ...]), each client's first row ``offsets`` [U] and its number of rows ``num_examples`` [U]."""

    arrays: dict
    num_examples: jax.Array
    offsets: jax.Array


class RoundOutput(NamedTuple):
    """What a round reports. Arrays over the cohort's slots have a leading [K] axis."""

    train_loss: jax.Array  # scalar, example-weighted over the cohort
    divergence: jax.Array  # [num_lora_modules] normalised aggregation error
    cohort: jax.Array  # [K] client ids
    cohort_mask: jax.Array  # [K] bool: the slot holds a client that took part (all True for fixed cohorts)
    cohort_overflow: jax.Array  # bool scalar: a Poisson cohort drew more clients than K slots
    client_params: Any  # trained client states, leaves [K, ...]; None when the round streams (Federation.streams)
    dp_non_finite: jax.Array  # int32 scalar: DP-SGD examples whose gradient held NaN or inf, over the cohort
    dp_overflows: jax.Array  # int32 scalar: DP-SGD steps whose Poisson batch overflowed its buffer, over the cohort
    finite: jax.Array  # [1 + trainable leaves (+ frozen leaves when the method rewrites the base)] bool:
    #   the training loss, then each new leaf, is finite; when any is not, the round returns the old state


def device_shards(data: FederatedData) -> ClientShards:
    """The client rows of ``data`` as device arrays."""
    return ClientShards({k: jnp.asarray(v) for k, v in data.train.items()}, jnp.asarray(data.num_train),
                        jnp.asarray(data.train_offsets, jnp.int32))
