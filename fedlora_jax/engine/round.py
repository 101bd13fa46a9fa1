"""Server state and the jitted federated round.

One call of the round function: sample a cohort, look up its clients' rows (stored once for all
clients; each local step gathers only the rows it samples), run every client's local update in
parallel (vmap over the client axis, optionally mapped over chunks of clients),
aggregate all LoRA modules (one vmapped call per group of same-shape modules) and the head, and
return the new server state. Shapes are static, so it compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation
from fedlora_jax.engine.client import LocalTrainer, train_clients
from fedlora_jax.data.base import FederatedData
from fedlora_jax.methods import LoraBytes, Method, ServerUpdate
from fedlora_jax.privacy import noisy_mean_of_updates, poisson_sample
from fedlora_jax.params import TrainableLayout, factor_mask, leaf_bytes


class ServerState(NamedTuple):
    """Everything a run carries between rounds (a pytree).

    params: global trainable state (LoRA factors + head).
    frozen: frozen base state (changes only for methods that fold updates into it).
    round: the next round's index (int32 scalar).
    key: PRNG key, split every round.
    method_state: what the method keeps at the server between rounds (a pytree; e.g. FedSA's
      per-client B banks [U, d_out, r]); () for most methods.
    """

    params: Any
    frozen: Any
    round: jax.Array
    key: jax.Array
    method_state: Any = ()


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


def init_server_state(params, frozen, seed: int, federation: "Federation | None" = None) -> ServerState:
    """Round 0 state; when a federation is given, with the method's initial server state and placed
    as its round takes it (whole on every device of its mesh)."""
    if federation is None:
        return ServerState(params, frozen, jnp.zeros((), jnp.int32), jax.random.key(seed), ())
    method_state = federation.method.init_state(params, federation.layout, federation.num_clients)
    return federation.replicated(ServerState(params, frozen, jnp.zeros((), jnp.int32), jax.random.key(seed),
                                             method_state))


def device_shards(data: FederatedData) -> ClientShards:
    return ClientShards({k: jnp.asarray(v) for k, v in data.train.items()}, jnp.asarray(data.num_train),
                        jnp.asarray(data.train_offsets, jnp.int32))


def normalised_weights(counted: jax.Array) -> jax.Array:
    """Client weights [K] from non-negative per-slot amounts [K]: they sum to 1 (all zero when
    every amount is 0, e.g. a Poisson cohort that drew nobody)."""
    return counted / jnp.maximum(jnp.sum(counted), 1.0)


def split_chunks(args, chunk: int):
    """(full chunks, remainder) of per-client arrays [K, ...]: leaves [K // chunk, chunk, ...]
    (None when chunk > K) and the last K % chunk clients (None when there are none)."""
    clients = jax.tree.leaves(args)[0].shape[0]
    full = clients // chunk * chunk
    grouped = jax.tree.map(lambda x: x[:full].reshape((full // chunk, chunk) + x.shape[1:]), args) if full else None
    rest = jax.tree.map(lambda x: x[full:], args) if full < clients else None
    return grouped, rest


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


@dataclasses.dataclass(frozen=True)
class UserDP:
    """User-level DP-FedAvg at the server: clip each client's update to ``clip_norm``, add
    Gaussian noise ``noise_multiplier * clip_norm`` once to the sum, divide by the cohort size."""

    clip_norm: float
    noise_multiplier: float


@dataclasses.dataclass(frozen=True)
class Federation:
    """Static description of a federated run (closed over by the jitted round)."""

    trainer: LocalTrainer
    method: Method
    layout: TrainableLayout
    cohort_size: int  # K: clients per round, or the slots of a Poisson cohort
    num_clients: int
    clients_per_chunk: int | None = None
    user_dp: UserDP | None = None
    lora_scaling: float = 1.0
    base_kernels: tuple[int, ...] = ()  # frozen-leaf index of each LoRA module's kernel [d_in, d_out]
    client_sampling_rate: float | None = None  # Poisson cohorts: each client's inclusion probability
    keep_client_params: bool = True  # the round returns the cohort's trained states (local evaluation needs them)
    devices: int = 1  # devices (of every process) the cohort's client axis is sharded over
    uniform_weights: bool = False  # every client weighs 1 / K, not n_u / sum n (federation.client_weights)

    def __post_init__(self):
        if self.user_dp is not None and not self.method.mean_based:
            raise ValueError(f"user-level DP needs a method that averages uploads (fedit, ffa, rolora), not {self.method.name!r}")
        if self.client_sampling_rate is not None and self.user_dp is None:
            raise ValueError("Poisson cohorts are for user-level DP (its fixed denominator); set user_dp")

    @property
    def expected_cohort(self) -> float:
        """The expected number of clients per round (the user-level mean's denominator)."""
        if self.client_sampling_rate is None:
            return float(self.cohort_size)
        return self.client_sampling_rate * self.num_clients

    @property
    def streams(self) -> bool:
        """The round reduces the uploads chunk by chunk (:meth:`stream_totals`,
        :meth:`finalise_stream`): a streaming method, a chunked cohort, no user-level DP and no
        need for the cohort's trained states. Its memory then grows with ``clients_per_chunk``,
        not with the cohort."""
        chunk = self.clients_per_chunk
        return (self.method.streaming and self.user_dp is None and not self.keep_client_params
                and chunk is not None and chunk < self.cohort_size)

    def split_key(self, key):
        """(next round's key, cohort key, training key, server-noise key)."""
        return tuple(jax.random.split(key, 4))

    def sample_cohort(self, cohort_key) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(client ids [K], mask [K] of slots that take part, overflow).

        Fixed cohorts: K distinct clients uniformly at random, every slot taken. Poisson
        cohorts: every client independently with probability ``client_sampling_rate``, the
        included ones first in random order; ``overflow`` says more were drawn than K slots hold
        (a random K of them take part).
        """
        if self.client_sampling_rate is None:
            ids = jax.random.choice(cohort_key, self.num_clients, (self.cohort_size,), replace=False)
            return ids, jnp.ones((self.cohort_size,), bool), jnp.zeros((), bool)
        return poisson_sample(cohort_key, self.num_clients, self.client_sampling_rate, self.cohort_size,
                              self.num_clients)

    def next_cohort(self, state: ServerState) -> np.ndarray:
        """The clients the next round will train (host-side preview, e.g. for privacy budgets)."""
        ids, mask, _ = jax.device_get(self.sample_cohort(self.split_key(state.key)[1]))
        return ids[mask]

    def run_clients(self, frozen, start_params, rows: dict, offsets, counts, keys, round_index, train_mask):
        """Local updates of K clients: all at once, or in groups of ``clients_per_chunk`` mapped one
        after another (``lax.map``; a last smaller group takes the remainder).

        ``start_params``/``offsets``/``counts``/``keys`` carry a leading [K] axis; ``frozen`` and
        ``rows`` (every client's rows [N, ...]) do not.
        Returns (trained params [K, ...], :class:`fedlora_jax.engine.client.LocalStats` over [K]).
        """

        def train(args):
            params, first, n, key = args
            return train_clients(self.trainer, frozen, params, rows, first, n, key, round_index, train_mask)

        args = (start_params, offsets, counts, keys)
        chunk = self.clients_per_chunk
        if chunk is None or chunk >= counts.shape[0]:
            return train(args)
        grouped, rest = split_chunks(args, chunk)
        done = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), jax.lax.map(train, grouped))
        if rest is None:
            return done
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), done, train(rest))

    def module_keys(self, key) -> dict:
        """Each LoRA module's server PRNG key (by module name), the same in stacked and streamed rounds."""
        position = {m.name: i for i, m in enumerate(self.layout.modules)}
        keys = {}
        for group in self.layout.shape_groups():
            split = jax.random.split(jax.random.fold_in(key, position[group[0].name]), len(group))
            keys.update({m.name: split[i] for i, m in enumerate(group)})
        return keys

    def _fold_into_base(self, frozen_leaves: list, module_position: int, base_delta) -> None:
        """Adds ``scaling * base_delta`` [d_out, d_in] to the module's frozen kernel [d_in, d_out]."""
        j = self.base_kernels[module_position]
        kernel = frozen_leaves[j]
        frozen_leaves[j] = (kernel + self.lora_scaling * base_delta.T).astype(kernel.dtype)

    def aggregate(self, client_params, weights, round_index, key, frozen):
        """New global trainable state from the cohort's states [K, ...], the (possibly updated)
        frozen state, and the per-module divergence."""
        leaves, treedef = jax.tree.flatten(client_params)
        frozen_leaves, frozen_def = jax.tree.flatten(frozen)
        new = [None] * len(leaves)
        divergence = [None] * len(self.layout.modules)
        position = {m.name: i for i, m in enumerate(self.layout.modules)}
        module_keys = self.module_keys(key)
        for group in self.layout.shape_groups():
            b = jnp.stack([leaves[m.b_index] for m in group])  # [M, K, d_out, r]
            a = jnp.stack([leaves[m.a_index] for m in group])  # [M, K, r, d_in]
            keys = jnp.stack([module_keys[m.name] for m in group])
            method = self.method

            def module_update(x):
                out = method.aggregate(x[0], x[1], weights, round_index, x[2])
                return out, method.divergence(x[0], x[1], weights, out)

            out, div = map_modules(module_update, (b, a, keys))
            for i, m in enumerate(group):
                new[m.b_index], new[m.a_index] = out.b[i], out.a[i]
                divergence[position[m.name]] = div[i]
                if out.base_delta is not None:
                    self._fold_into_base(frozen_leaves, position[m.name], out.base_delta[i])
        for i in self.layout.other_indices:
            new[i] = aggregation.weighted_mean(leaves[i], weights).astype(leaves[i].dtype)
        return jax.tree.unflatten(treedef, new), jax.tree.unflatten(frozen_def, frozen_leaves), jnp.stack(divergence)

    def stream_totals(self, state: "ServerState", rows: dict, cohort, offsets, counts, keys, weights, train_mask):
        """Trains the given clients chunk by chunk and reduces each chunk's uploads into running
        sums as it goes (``lax.scan``; a last smaller chunk takes the remainder), so no [K, ...]
        trained state is ever formed. Returns (totals: per-module summaries, per-module ideal
        updates M and the weighted head; :class:`fedlora_jax.engine.client.LocalStats` over the clients)."""
        method, modules, chunk = self.method, self.layout.modules, self.clients_per_chunk

        def train_and_summarise(args):
            ids, first, n, key, w = args
            start = method.client_start(state.method_state, state.params, ids, self.layout)
            trained, stats = train_clients(self.trainer, state.frozen, start, rows, first, n, key, state.round,
                                           train_mask)
            leaves = jax.tree.leaves(trained)
            f32 = jnp.float32
            summary = (
                [method.summarise(leaves[m.b_index], leaves[m.a_index], w) for m in modules],
                [jnp.einsum("k,kor,kri->oi", w.astype(f32), leaves[m.b_index].astype(f32),
                            leaves[m.a_index].astype(f32)) for m in modules],  # the ideal update M, for divergence
                [aggregation.weighted_mean(leaves[i], w) for i in self.layout.other_indices],
            )
            return summary, stats

        grouped, rest = split_chunks((cohort, offsets, counts, keys, weights), chunk)
        if grouped is None:
            return train_and_summarise(rest)
        first = jax.tree.map(lambda x: x[0], grouped)
        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(train_and_summarise, first)[0])

        def body(total, group):
            summary, stats = train_and_summarise(group)
            return jax.tree.map(jnp.add, total, summary), stats

        total, stats = jax.lax.scan(body, zero, grouped)
        stats = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stats)
        if rest is not None:
            summary, rest_stats = train_and_summarise(rest)
            total = jax.tree.map(jnp.add, total, summary)
            stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), stats, rest_stats)
        return total, stats

    def finalise_stream(self, state: "ServerState", totals, server_key):
        """(new global params, frozen, divergence [modules]) from the cohort's streamed totals."""
        method, modules = self.method, self.layout.modules
        leaves_before, treedef = jax.tree.flatten(state.params)
        summaries, ideals, heads = totals
        new = list(leaves_before)
        frozen_leaves, frozen_def = jax.tree.flatten(state.frozen)
        module_keys = self.module_keys(server_key)
        divergence = []
        for position, (m, summary, ideal) in enumerate(zip(modules, summaries, ideals)):
            out = method.finalise(summary, ideal, leaves_before[m.b_index], leaves_before[m.a_index], state.round,
                                  module_keys[m.name])
            new[m.b_index], new[m.a_index] = out.b, out.a
            divergence.append(method.streamed_divergence(ideal, out))
            if out.base_delta is not None:
                self._fold_into_base(frozen_leaves, position, out.base_delta)
        for i, head in zip(self.layout.other_indices, heads):
            new[i] = head.astype(leaves_before[i].dtype)
        return jax.tree.unflatten(treedef, new), jax.tree.unflatten(frozen_def, frozen_leaves), jnp.stack(divergence)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The 1-D ``clients`` mesh over the first ``self.devices`` devices of all processes."""
        return jax.make_mesh((self.devices,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[: self.devices])

    @property
    def everywhere(self) -> jax.sharding.NamedSharding:
        """Whole arrays on every device of the mesh."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def replicated(self, tree):
        """``tree`` placed whole on every device of the mesh (the server state, the client rows);
        unchanged on one device."""
        if self.devices <= 1:
            return tree

        def put(x):  # from host values: devices of other processes cannot take a device array
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            return jax.device_put(np.asarray(x), self.everywhere)

        return jax.tree.map(put, tree)

    def on_devices(self, train, per_client: tuple, shared: tuple, reduced: bool):
        """``train(per_client, shared)`` with the client axis of ``per_client`` (arrays [K, ...])
        sharded over the mesh's devices (``shard_map``) and ``shared`` (the state, the client rows)
        replicated on each; ``train`` must close over nothing else that is an array. The cohort is
        padded to a multiple of the device count with empty slots (zeros: no rows, weight 0)
        whose outputs are dropped. ``train`` returns (totals, stats) when ``reduced`` (totals are
        summed over devices) or (per-client outputs, stats).
        """
        if self.devices <= 1:
            return train(per_client, shared)
        k = self.cohort_size
        pad = -k % self.devices
        is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        # PRNG keys travel as their key data
        key_impls = [jax.random.key_impl(x) if is_key(x) else None for x in jax.tree.leaves((per_client, shared))]
        treedef = jax.tree.structure((per_client, shared))
        padded = lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        as_data = lambda x: jax.random.key_data(x) if is_key(x) else x
        spec = jax.sharding.PartitionSpec

        def local(per_client_data, shared_data):
            leaves = [x if impl is None else jax.random.wrap_key_data(x, impl=impl)
                      for x, impl in zip(jax.tree.leaves((per_client_data, shared_data)), key_impls)]
            first, stats = train(*jax.tree.unflatten(treedef, leaves))
            return (jax.lax.psum(first, "clients") if reduced else first), stats

        out_first = spec() if reduced else spec("clients")
        # check_vma=False: with the check, a scan carry started from replicated zeros trained the
        # chunk's clients differently from one device (seen with jax 0.10.2); the psum is explicit
        first, stats = jax.shard_map(local, mesh=self.mesh, in_specs=(spec("clients"), spec()),
                                     out_specs=(out_first, spec("clients")), check_vma=False)(
            jax.tree.map(lambda x: padded(as_data(x)), per_client), jax.tree.map(as_data, shared))
        trim = lambda tree: jax.tree.map(lambda x: x[:k], tree)
        return (first if reduced else trim(first)), trim(stats)

    def private_mean(self, global_params, client_params, taking_part, trained, key):
        """User-level DP-FedAvg: global + noisy mean of the clipped updates of the clients taking
        part ([K] 0/1), over the expected cohort. Only what clients train (and upload) moves and
        gets noise: ``trained`` is the factor mask (FFA-LoRA's A stays bit-identical)."""
        deltas = jax.tree.map(lambda c, g: c - g[None], client_params, global_params)
        uniform = taking_part.astype(jnp.float32)
        mean_delta = noisy_mean_of_updates(deltas, uniform, self.user_dp.clip_norm, self.user_dp.noise_multiplier,
                                           key, expected_clients=self.expected_cohort, noise_mask=trained)
        params = jax.tree.map(lambda g, d: g + d.astype(g.dtype), global_params, mean_delta)
        leaves, b_a = jax.tree.leaves(client_params), jax.tree.leaves(params)
        weights = normalised_weights(uniform)
        divergence = jnp.stack([aggregation.divergence(leaves[m.b_index], leaves[m.a_index], weights,
                                                       b_a[m.b_index], b_a[m.a_index]) for m in self.layout.modules])
        return params, divergence

    def client_weights(self, counts: jax.Array, taking_part: jax.Array) -> jax.Array:
        """The aggregation weights w [K] of a cohort (zero for empty slots, summing to 1 over the
        others) from its training-example counts [K] and participation mask [K]."""
        counted = taking_part.astype(jnp.float32) * (1.0 if self.uniform_weights else counts.astype(jnp.float32))
        return normalised_weights(counted)

    def round(self, state: ServerState, shards: ClientShards) -> tuple[ServerState, RoundOutput]:
        """One federated round (pure; jit it with :meth:`compile_round`)."""
        key, cohort_key, train_key, server_key = self.split_key(state.key)
        cohort, taking_part, overflow = self.sample_cohort(cohort_key)
        counts, offsets = shards.num_examples[cohort], shards.offsets[cohort]
        weights = self.client_weights(counts, taking_part)
        train_a, train_b = self.method.trains(state.round)
        mask = factor_mask(self.layout, state.params, train_a, train_b)
        keys = jax.random.split(train_key, self.cohort_size)
        rows = shards.arrays
        if self.streams:
            client_params = None
            def stream(per_client, shared):
                state, rows, mask = shared
                return self.stream_totals(state, rows, *per_client, mask)

            totals, stats = self.on_devices(stream, (cohort, offsets, counts, keys, weights), (state, rows, mask),
                                            reduced=True)
            params, frozen, divergence = self.finalise_stream(state, totals, server_key)
        else:
            start = self.method.client_start(state.method_state, state.params, cohort, self.layout)
            def train(per_client, shared):
                frozen, rows, round_index, mask = shared
                start, *sampling = per_client
                return self.run_clients(frozen, start, rows, *sampling, round_index, mask)

            client_params, stats = self.on_devices(train, (start, offsets, counts, keys),
                                                   (state.frozen, rows, state.round, mask), reduced=False)
            frozen = state.frozen
            if self.user_dp is None:
                params, frozen, divergence = self.aggregate(client_params, weights, state.round, server_key, frozen)
            else:
                params, divergence = self.private_mean(state.params, client_params, taking_part, mask, server_key)
        params, method_state = self.method.update_state(state.method_state, ServerUpdate(
            state.params, params, client_params, cohort, taking_part, state.round, self.layout))
        new_state = ServerState(params, frozen, state.round + 1, key, method_state)
        train_loss = jnp.sum(weights * stats.loss)
        finite, new_state = self._keep_if_finite(train_loss, new_state, state)
        return new_state, RoundOutput(train_loss, divergence, cohort, taking_part, overflow,
                                      client_params, jnp.sum(stats.non_finite * taking_part),
                                      jnp.sum(stats.overflows * taking_part), finite)

    def _keep_if_finite(self, train_loss, new_state: ServerState, old_state: ServerState):
        """(finite flags, the new state if every flag holds, else the old one). The old state's
        buffers are donated to the round, so the last good state must come back from it."""
        checked = [new_state.params] + ([new_state.frozen] if self.method.modifies_base else [])
        finite = jnp.stack([jnp.isfinite(train_loss)] + [jnp.all(jnp.isfinite(x)) for t in checked
                                                          for x in jax.tree.leaves(t)])
        ok = jnp.all(finite)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        frozen = keep(new_state.frozen, old_state.frozen) if self.method.modifies_base else new_state.frozen
        key = jax.random.wrap_key_data(keep(jax.random.key_data(new_state.key), jax.random.key_data(old_state.key)))
        state = ServerState(keep(new_state.params, old_state.params), frozen, keep(new_state.round, old_state.round),
                            key, keep(new_state.method_state, old_state.method_state))
        return finite, state

    def compile_round(self, donate: bool = True):
        """The jitted round; the server state's buffers are donated (unless not ``donate``). On
        several devices its inputs and outputs are replicated (arrays not yet placed are placed so),
        so every process can read them (and the next round's state)."""
        donated = (0,) if donate else ()
        if self.devices <= 1:
            return jax.jit(self.round, donate_argnums=donated)
        return jax.jit(self.round, donate_argnums=donated, in_shardings=self.everywhere, out_shardings=self.everywhere)

    def communication_bytes(self, params, frozen, round_index: int, clients: int | None = None) -> tuple[int, int]:
        """Exact (bytes_up, bytes_down) of one round over the ``clients`` that took part (default K)."""
        sizes, frozen_sizes = leaf_bytes(params), leaf_bytes(frozen)
        k = self.cohort_size if clients is None else clients
        head = int(sum(sizes[i] for i in self.layout.other_indices))
        lora = LoraBytes(int(sum(sizes[m.a_index] for m in self.layout.modules)),
                         int(sum(sizes[m.b_index] for m in self.layout.modules)),
                         int(sum(frozen_sizes[j] for j in self.base_kernels)))
        up = int(self.method.upload_bytes(round_index, lora))
        down = int(self.method.download_bytes(round_index, lora, k))
        return k * (up + head), k * (down + head)
