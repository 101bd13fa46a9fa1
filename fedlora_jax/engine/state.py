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
    residuals: with error feedback on compressed uploads, what each client has not yet sent, a
      tree like ``params`` with leaves [U, ...] (float32); () without.
    """

    params: Any
    frozen: Any
    round: jax.Array
    key: jax.Array
    method_state: Any = ()
    optimizer_state: Any = ()
    residuals: Any = ()


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
    reported: jax.Array  # [K] bool: the client took part and its upload arrived (federation.dropout)
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


def keep_if_finite(train_loss: jax.Array, new_state: ServerState, old_state: ServerState,
                   modifies_base: bool) -> tuple[jax.Array, ServerState]:
    """(finite flags, the new state if every flag holds, else the old one). The old state's
    buffers are donated to the round, so the last good state must come back from it. The flags:
    the training loss, each new trainable leaf and (``modifies_base``) each new frozen leaf."""
    checked = [new_state.params] + ([new_state.frozen] if modifies_base else [])
    finite = jnp.stack([jnp.isfinite(train_loss)] + [jnp.all(jnp.isfinite(x)) for t in checked
                                                      for x in jax.tree.leaves(t)])
    ok = jnp.all(finite)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    frozen = keep(new_state.frozen, old_state.frozen) if modifies_base else new_state.frozen
    key = jax.random.wrap_key_data(keep(jax.random.key_data(new_state.key), jax.random.key_data(old_state.key)))
    state = ServerState(keep(new_state.params, old_state.params), frozen, keep(new_state.round, old_state.round),
                        key, keep(new_state.method_state, old_state.method_state),
                        keep(new_state.optimizer_state, old_state.optimizer_state),
                        keep(new_state.residuals, old_state.residuals))
    return finite, state


def unless_nobody_reported(reported: jax.Array, new_state: ServerState, old_state: ServerState) -> ServerState:
    """``new_state``, or, when no client's upload arrived (``reported`` [K] all False), the old
    trained state (params, base, method, optimiser and residuals) with the new round and key."""
    nobody = ~jnp.any(reported)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(nobody, o, n), new, old)  # noqa: E731
    return ServerState(keep(new_state.params, old_state.params), keep(new_state.frozen, old_state.frozen),
                       new_state.round, new_state.key, keep(new_state.method_state, old_state.method_state),
                       keep(new_state.optimizer_state, old_state.optimizer_state),
                       keep(new_state.residuals, old_state.residuals))
