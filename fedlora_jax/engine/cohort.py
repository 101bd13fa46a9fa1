"""The round's cohort: who takes part, how much each weighs, and in which chunks it trains."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedlora_jax.privacy import poisson_sample


@dataclasses.dataclass(frozen=True)
class Cohort:
    """How a round draws its clients (static).

    size: K, clients per round, or the slots of a Poisson cohort.
    num_clients: U, the population.
    sampling_rate: Poisson cohorts (user-level DP): each client's inclusion probability; None for
      fixed cohorts of K distinct clients.
    uniform_weights: every client weighs 1 / K, not n_u / sum n (``federation.client_weights``).
    """

    size: int
    num_clients: int
    sampling_rate: float | None = None
    uniform_weights: bool = False

    @property
    def expected_size(self) -> float:
        """The expected number of clients per round (the user-level mean's denominator)."""
        return float(self.size) if self.sampling_rate is None else self.sampling_rate * self.num_clients

    def sample(self, key) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(client ids [K], mask [K] of slots that take part, overflow).

        Fixed cohorts: K distinct clients uniformly at random, every slot taken. Poisson
        cohorts: every client independently with probability ``sampling_rate``, the included
        ones first in random order; ``overflow`` says more were drawn than K slots hold (a random
        K of them take part).
        """
        if self.sampling_rate is None:
            ids = jax.random.choice(key, self.num_clients, (self.size,), replace=False)
            return ids, jnp.ones((self.size,), bool), jnp.zeros((), bool)
        return poisson_sample(key, self.num_clients, self.sampling_rate, self.size, self.num_clients)

    def weights(self, counts: jax.Array, taking_part: jax.Array) -> jax.Array:
        """The aggregation weights w [K] (zero for empty slots, summing to 1 over the others) from
        the training-example counts [K] and the participation mask [K]."""
        counted = taking_part.astype(jnp.float32) * (1.0 if self.uniform_weights else counts.astype(jnp.float32))
        return normalised_weights(counted)


@dataclasses.dataclass(frozen=True)
class ClientSteps:
    """Stragglers (static): a ``fraction`` of the population, drawn once from ``seed``, run only
    ``steps`` local steps each round; the other clients run all of them."""

    fraction: float
    steps: int
    seed: int = 0

    def stragglers(self, num_clients: int) -> jax.Array:
        """[U] bool, the clients that are stragglers (the same in every round and on the host)."""
        return jax.random.bernoulli(jax.random.key(self.seed), self.fraction, (num_clients,))

    def budgets(self, cohort: jax.Array, num_clients: int, local_steps: int) -> jax.Array:
        """[K] int32 local steps of each cohort client."""
        return jnp.where(self.stragglers(num_clients)[cohort], self.steps, local_steps).astype(jnp.int32)


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
