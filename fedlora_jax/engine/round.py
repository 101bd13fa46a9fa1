"""The jitted federated round.

One call: sample a cohort, look up its clients' rows (stored once for all clients; each local step
gathers only the rows it samples), run every client's local update in parallel (vmap over the
client axis, optionally mapped over chunks of clients, sharded over the ``clients`` mesh),
aggregate every LoRA module and the head (:mod:`fedlora_jax.engine.aggregate`), apply the server
optimiser, and return the new server state. Shapes are static, so it compiles once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedlora_jax.engine import sharding
from fedlora_jax.engine.aggregate import BaseFolding, UserDP, aggregate_stacked, finalise
from fedlora_jax.engine.client import LocalTrainer, train_clients
from fedlora_jax.engine.cohort import ClientSteps, Cohort, split_chunks
from fedlora_jax.engine.streaming import stream_totals
from fedlora_jax.engine import uploads
from fedlora_jax.engine.state import (ClientShards, RoundOutput, ServerState, keep_if_finite,
                                      unless_nobody_reported)
from fedlora_jax.aggregation.compression import Compression
from fedlora_jax.methods import Method, ServerUpdate
from fedlora_jax.methods.server_optimizers import init_server_optimizer, server_optimizer_step
from fedlora_jax.params import TrainableLayout, factor_mask


@dataclasses.dataclass(frozen=True)
class Federation:
    """Static description of a federated run (closed over by the jitted round).

    ``clients_per_chunk``: clients vmapped together (None: the whole share of a device at once).
    ``keep_client_params``: the round returns the cohort's trained states (local evaluation needs them).
    ``devices``: devices (of every process) the round runs on; ``model_devices`` of them hold
    each client's model (the frozen base split over the mesh's ``model`` axis), so the cohort's
    client axis is sharded over ``devices // model_devices`` groups.
    ``server_optimizer``: an optax transform of the round's pseudo-gradient (global - aggregate;
    FedAvgM, FedAdam, FedYogi), or None for plain averaging.
    ``compression``: what clients' uploads go through (:mod:`fedlora_jax.engine.uploads`), or None;
    with ``error_feedback`` each client adds what its earlier messages left out (the state's
    residual banks [U, ...]), and the round holds the cohort's states (it does not stream).
    ``dropout``: the probability that a sampled client trains but its upload never arrives; the
    round aggregates the uploads that arrive (weights renormalised) and keeps the trained state
    when none does. ``client_steps``: stragglers that run fewer local steps (:class:`ClientSteps`).
    """

    trainer: LocalTrainer
    method: Method
    layout: TrainableLayout
    cohort: Cohort
    clients_per_chunk: int | None = None
    user_dp: UserDP | None = None
    folding: BaseFolding = BaseFolding()
    keep_client_params: bool = True
    devices: int = 1
    model_devices: int = 1
    server_optimizer: optax.GradientTransformation | None = None
    compression: Compression | None = None
    error_feedback: bool = False
    dropout: float = 0.0
    client_steps: ClientSteps | None = None

    def __post_init__(self):
        if self.error_feedback and self.compression is None:
            raise ValueError("error feedback needs a compression scheme")
        if self.user_dp is not None and not self.method.mean_based:
            raise ValueError(
                f"user-level DP needs a method that averages uploads (fedit, ffa, rolora), not {self.method.name!r}"
            )
        if self.server_optimizer is not None and not self.method.mean_based:
            raise ValueError(f"a server optimiser needs a method that averages uploads (fedit, ffa, rolora), "
                             f"not {self.method.name!r}")
        if self.cohort.sampling_rate is not None and self.user_dp is None:
            raise ValueError("Poisson cohorts are for user-level DP (its fixed denominator); set user_dp")

    @property
    def cohort_size(self) -> int:
        return self.cohort.size

    @property
    def expected_cohort(self) -> float:
        return self.cohort.expected_size

    @property
    def streams(self) -> bool:
        """The round reduces the uploads chunk by chunk (:func:`stream_totals`): a streaming
        method, a chunked cohort, no user-level DP and no need for the cohort's trained states.
        Its memory then grows with ``clients_per_chunk``, not with the cohort."""
        chunk = self.clients_per_chunk
        return (self.method.streaming and self.user_dp is None and not self.keep_client_params
                and not self.error_feedback and chunk is not None and chunk < self.cohort.size)

    # -- placement -------------------------------------------------------------------------------

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return sharding.make_mesh(self.devices, self.model_devices)

    @property
    def everywhere(self) -> jax.sharding.NamedSharding:
        return sharding.everywhere(self.mesh)

    def replicated(self, tree):
        """``tree`` placed whole on every device of the mesh; unchanged on one device."""
        return sharding.replicate(tree, self.mesh)

    def base_shardings(self, frozen):
        """Where each frozen leaf lives (:func:`fedlora_jax.engine.sharding.base_shardings`)."""
        return sharding.base_shardings(frozen, self.mesh, self.model_devices)

    def state_shardings(self, state: ServerState) -> ServerState:
        """Shardings of a server state (a prefix tree of it): the frozen base split as
        :meth:`base_shardings` says, everything else whole on every device."""
        everywhere = self.everywhere
        return ServerState(everywhere, self.base_shardings(state.frozen), everywhere, everywhere, everywhere,
                           everywhere, everywhere)

    def placed(self, state: ServerState) -> ServerState:
        """``state`` placed as the round takes it; unchanged on one device."""
        return state if self.devices <= 1 else sharding.place(state, self.state_shardings(state))

    def initial_state(self, params, frozen, seed: int) -> ServerState:
        """Round 0's state (the method's and the server optimiser's initial states), not placed."""
        method_state = self.method.init_state(params, self.layout, self.cohort.num_clients)
        optimizer_state = () if self.server_optimizer is None else init_server_optimizer(self.server_optimizer, params)
        residuals = uploads.residual_banks(params, self.cohort.num_clients) if self.error_feedback else ()
        return ServerState(params, frozen, jnp.zeros((), jnp.int32), jax.random.key(seed), method_state,
                           optimizer_state, residuals)

    def init_state(self, params, frozen, seed: int) -> ServerState:
        """Round 0's state placed as the round takes it (:meth:`placed`)."""
        return self.placed(self.initial_state(params, frozen, seed))

    # -- the cohort ------------------------------------------------------------------------------

    def split_key(self, key):
        """(next round's key, cohort key, training key, server-noise key)."""
        return tuple(jax.random.split(key, 4))

    def sample_cohort(self, cohort_key) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.cohort.sample(cohort_key)

    def next_cohort(self, state: ServerState) -> np.ndarray:
        """The clients the next round will train (host-side preview, e.g. for privacy budgets)."""
        ids, mask, _ = jax.device_get(self.sample_cohort(self.split_key(state.key)[1]))
        return ids[mask]

    def client_weights(self, counts: jax.Array, taking_part: jax.Array) -> jax.Array:
        return self.cohort.weights(counts, taking_part)

    # -- training and aggregation ----------------------------------------------------------------

    def run_clients(self, frozen, start_params, rows: dict, offsets, counts, keys, budgets, round_index,
                    train_mask):
        """Local updates of K clients: all at once, or in groups of ``clients_per_chunk`` mapped one
        after another (``lax.map``; a last smaller group takes the remainder).

        ``start_params``/``offsets``/``counts``/``keys``/``budgets`` (local steps, or None for all)
        carry a leading [K] axis; ``frozen`` and ``rows`` (every client's rows [N, ...]) do not.
        Returns (trained params [K, ...], :class:`fedlora_jax.engine.client.LocalStats` over [K]).
        """

        def train(args):
            params, first, n, key, budget = args
            return train_clients(self.trainer, frozen, params, rows, first, n, key, round_index, train_mask, budget)

        args = (start_params, offsets, counts, keys, budgets)
        chunk = self.clients_per_chunk
        if chunk is None or chunk >= counts.shape[0]:
            return train(args)
        grouped, rest = split_chunks(args, chunk)
        done = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), jax.lax.map(train, grouped))
        if rest is None:
            return done
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), done, train(rest))

    def aggregate(self, client_params, weights, round_index, key, frozen, params_before=None):
        """New global trainable state from the cohort's states [K, ...], the (possibly updated)
        frozen state, and the per-module divergence (:func:`fedlora_jax.engine.aggregate.aggregate_stacked`)."""
        return aggregate_stacked(self.method, self.layout, self.folding, client_params, weights, round_index, key,
                                 frozen, params_before)

    def round(self, state: ServerState, shards: ClientShards) -> tuple[ServerState, RoundOutput]:
        """One federated round (pure; jit it with :meth:`compile_round`)."""
        key, cohort_key, train_key, server_key = self.split_key(state.key)
        cohort, taking_part, overflow = self.sample_cohort(cohort_key)
        reported = taking_part
        if self.dropout:
            reported = taking_part & (jax.random.uniform(jax.random.fold_in(cohort_key, 1), taking_part.shape)
                                      >= self.dropout)
        counts, offsets = shards.num_examples[cohort], shards.offsets[cohort]
        weights = self.client_weights(counts, reported)
        train_a, train_b = self.method.trains(state.round)
        mask = factor_mask(self.layout, state.params, train_a, train_b)
        keys = jax.random.split(train_key, self.cohort.size)
        budgets = (None if self.client_steps is None else
                   self.client_steps.budgets(cohort, self.cohort.num_clients, self.trainer.local_steps))
        rows = shards.arrays
        frozen, residuals = state.frozen, state.residuals
        if self.streams:
            client_params = got = None  # never formed: each chunk is reduced as it finishes

            def stream(per_client, shared):
                state, rows, mask = shared
                return stream_totals(self, state, rows, *per_client, mask)

            totals, stats = sharding.shard_clients(stream, (cohort, offsets, counts, keys, weights, budgets),
                                                   (state, rows, mask), reduced=True, mesh=self.mesh)
            params, frozen, divergence = finalise(self.method, self.layout, self.folding, totals, state.params,
                                                  frozen, state.round, server_key)
        else:
            start = self.method.client_start(state.method_state, state.params, cohort, self.layout)

            def train(per_client, shared):
                frozen, rows, round_index, mask = shared
                start, *sampling = per_client
                return self.run_clients(frozen, start, rows, *sampling, round_index, mask)

            client_params, stats = sharding.shard_clients(train, (start, offsets, counts, keys, budgets),
                                                          (frozen, rows, state.round, mask), reduced=False,
                                                          mesh=self.mesh)
            owed = jax.tree.map(lambda bank: bank[cohort], residuals) if self.error_feedback else None
            got, owed = uploads.received(self.compression, self.method, self.layout, start, client_params, state.round,
                                         keys, owed)
            if self.error_feedback:
                residuals = uploads.write_residuals(residuals, cohort, reported, owed)
            if self.user_dp is None:
                params, frozen, divergence = self.aggregate(got, weights, state.round, server_key, frozen, state.params)
            else:
                params, divergence = self.user_dp.mean(self.layout, state.params, got, reported, mask,
                                                       server_key, self.expected_cohort)
        params, method_state = self.method.update_state(state.method_state, ServerUpdate(
            state.params, params, got, cohort, reported, state.round, self.layout))
        optimizer_state = state.optimizer_state
        if self.server_optimizer is not None:
            params, optimizer_state = server_optimizer_step(self.server_optimizer, optimizer_state, state.params,
                                                            params, trained=mask)
        new_state = ServerState(params, frozen, state.round + 1, key, method_state, optimizer_state, residuals)
        if self.dropout:
            new_state = unless_nobody_reported(reported, new_state, state)
        train_loss = jnp.sum(self.client_weights(counts, taking_part) * stats.loss)  # of every client that trained
        finite, new_state = keep_if_finite(train_loss, new_state, state, self.method.modifies_base)
        return new_state, RoundOutput(train_loss, divergence, cohort, taking_part, reported, overflow,
                                      client_params, jnp.sum(stats.non_finite * taking_part),
                                      jnp.sum(stats.overflows * taking_part), finite)

    def compile_round(self, donate: bool = True, template: ServerState | None = None):
        """The jitted round; the server state's buffers are donated (unless not ``donate``). On
        several devices its inputs and outputs are placed as :meth:`state_shardings` says (whole
        on every device but a split base; ``template``: a state of the round's structure, needed
        then), so every process can read the next round's state and the outputs."""
        donated = (0,) if donate else ()
        if self.devices <= 1:
            return jax.jit(self.round, donate_argnums=donated)
        if self.model_devices > 1 and template is None:
            raise ValueError("compile_round needs a template state to place a base split over model devices")
        state = self.everywhere if self.model_devices <= 1 else self.state_shardings(template)
        shardings = (state, self.everywhere)
        return jax.jit(self.round, donate_argnums=donated, in_shardings=shardings, out_shardings=shardings)

    def communication_bytes(self, params, frozen, round_index: int, clients: int | None = None,
                            reported: int | None = None) -> tuple[int, int]:
        """Exact (bytes_up, bytes_down) of one round: ``clients`` took part (default K) and the
        uploads of ``reported`` of them arrived (default all)."""
        k = self.cohort.size if clients is None else clients
        return uploads.communication_bytes(self, params, frozen, round_index, k if reported is None else reported, k)


def init_server_state(params, frozen, seed: int, federation: Federation | None = None) -> ServerState:
    """Round 0 state; when a federation is given, with its method's and server optimiser's initial
    states and placed as its round takes it (:meth:`Federation.init_state`)."""
    if federation is None:
        return ServerState(params, frozen, jnp.zeros((), jnp.int32), jax.random.key(seed))
    return federation.init_state(params, frozen, seed)
