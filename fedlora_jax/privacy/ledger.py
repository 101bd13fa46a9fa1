"""Host-side privacy bookkeeping of a run: noise calibration, per-client epsilon, budget stops.

Record level: client u runs DP-SGD with sampling rate q_u = min(1, b / n_u) for ``local_steps``
steps in every round it takes part in, so after k_u rounds its guarantee is that of
``k_u * local_steps`` compositions of the sampled Gaussian mechanism with rate q_u. The run
reports the maximum over clients. Calibration from a target picks sigma for the worst case:
the largest q_u taking part in every round. With Poisson sampling the static buffer may
overflow (rarely): each client's delta grows by what its overflow probability allows
(:func:`fedlora_jax.privacy.overflow_delta`), and the run reports the largest.

User level: each round adds noise once to the clipped sum of the cohort's updates. Fixed-size
cohorts (K of U without replacement) are accounted under replace-one neighbours; Poisson cohorts
(each client with probability K / U, in a static buffer of slots) under add-or-remove-one, with
the slots' overflow folded into delta as above.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy.stats import binom

from fedlora_jax.privacy.accounting import (
    epsilon,
    noise_multiplier_for,
    user_level_epsilon,
    user_level_noise_multiplier_for,
)
from fedlora_jax.privacy.sampling import client_poisson_buffer_size, overflow_delta, overflow_probability


class BudgetExceeded(RuntimeError):
    """The next round would push some guarantee past its target epsilon."""


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(sigma: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    return epsilon(sigma, rate, steps, delta, accountant)


@functools.lru_cache(maxsize=1024)
def _cached_user_epsilon(sigma: float, clients: int, cohort: int, rounds: int, delta: float, accountant: str,
                         sampling: str) -> float:
    return user_level_epsilon(sigma, clients, cohort, rounds, delta, accountant, sampling)


def cohort_slots(num_clients: int, cohort_size: int, overflow_bound: float) -> int:
    """Static slots of a Poisson cohort of expected size K = cohort_size out of U clients: the
    (1 - p) quantile of Binomial(U + 1, K / U) (the data and its add-one neighbour), between K
    and U + 1 (a slot beyond the U real clients stays empty)."""
    rate = cohort_size / num_clients
    return int(max(cohort_size, binom.isf(overflow_bound, num_clients + 1, rate)))


@dataclasses.dataclass
class PrivacyLedger:
    """Tracks participations and the epsilons (and deltas) they imply.

    Attributes:
      client_rates: [U] record-level sampling rate of each client (None when record level is off).
      local_steps: DP-SGD steps per participation.
      noise_multiplier / target_epsilon: record level.
      record_buffer: slots of the Poisson buffer of a DP-SGD step (0 for shuffled batches).
      record_overflow: [U] per-step probability that client u's Poisson sample overflows the
        buffer (zeros for shuffled batches).
      num_clients, user_cohort: U and the (expected) cohort size K (user_cohort None when user
        level is off); client_sampling: "fixed" or "poisson".
      cohort_slots: slots of a Poisson cohort (K for fixed cohorts); user_overflow: per-round
        probability that a Poisson cohort overflows them.
      user_noise_multiplier / user_target_epsilon: user level.
      delta, accountant: shared.
      participations: [U] rounds each client has taken part in so far.
      rounds_done: rounds completed.
      client_steps: [U] DP-SGD steps of each client per participation when they differ
        (stragglers); None: ``local_steps`` for every client.
    """

    client_rates: np.ndarray | None
    local_steps: int
    noise_multiplier: float | None
    target_epsilon: float | None
    record_buffer: int
    record_overflow: np.ndarray | None
    num_clients: int
    user_cohort: int | None
    client_sampling: str
    cohort_slots: int
    user_overflow: float
    user_noise_multiplier: float | None
    user_target_epsilon: float | None
    delta: float
    accountant: str
    participations: np.ndarray
    rounds_done: int = 0
    client_steps: np.ndarray | None = None

    @classmethod
    def create(cls, privacy, num_train: np.ndarray, batch_size: int, local_steps: int, rounds: int,
               cohort_size: int, client_steps: np.ndarray | None = None) -> "PrivacyLedger":
        """Builds the ledger: calibrates any noise multiplier given only as a target epsilon (for
        clients running all ``local_steps``) and sizes the Poisson buffers
        (``privacy.overflow_probability`` per draw). ``client_steps``: [U] steps per
        participation of each client, when stragglers run fewer."""
        num_train = np.asarray(num_train)
        num_clients = len(num_train)
        bound = privacy.overflow_probability
        rates = buffer = overflow = sigma = None
        if privacy.record_level:
            rates = np.minimum(1.0, batch_size / np.maximum(num_train, 1))
            sigma = privacy.noise_multiplier
            if sigma is None:
                sigma = noise_multiplier_for(privacy.target_epsilon, float(rates.max()), rounds * local_steps,
                                             privacy.delta, privacy.accountant)
            poisson = privacy.sampling == "poisson"
            buffer = client_poisson_buffer_size(num_train, batch_size, bound) if poisson else 0
            overflow = overflow_probability(num_train, rates, buffer) if poisson else np.zeros(num_clients)
        cohort, slots, user_overflow, user_sigma = None, cohort_size, 0.0, None
        if privacy.user_level:
            cohort = cohort_size
            if privacy.client_sampling == "poisson":
                slots = cohort_slots(num_clients, cohort_size, bound)
                user_overflow = float(overflow_probability(num_clients, cohort_size / num_clients, slots))
            user_sigma = privacy.user_noise_multiplier
            if user_sigma is None:
                user_sigma = user_level_noise_multiplier_for(privacy.user_target_epsilon, num_clients, cohort_size,
                                                             rounds, privacy.delta, privacy.accountant,
                                                             privacy.client_sampling)
        return cls(rates, local_steps, sigma, privacy.target_epsilon if privacy.record_level else None,
                   buffer or 0, overflow, num_clients, cohort, privacy.client_sampling, slots, user_overflow,
                   user_sigma, privacy.user_target_epsilon if privacy.user_level else None,
                   privacy.delta, privacy.accountant, np.zeros(num_clients, np.int64),
                   client_steps=None if client_steps is None else np.asarray(client_steps, np.int64))

    @property
    def active(self) -> bool:
        """Whether any guarantee is tracked (record or user level)."""
        return self.client_rates is not None or self.user_cohort is not None

    def client_epsilons(self, participations: np.ndarray) -> np.ndarray:
        """[U] record-level epsilon of every client after the given participations (0 for none)."""
        if self.client_rates is None:
            return np.zeros(len(participations))
        return np.array([_cached_epsilon(self.noise_multiplier, float(q), int(k) * int(s), self.delta,
                                         self.accountant) if k > 0 else 0.0
                         for q, k, s in zip(self.client_rates, participations, self.steps_per_participation)])

    @property
    def steps_per_participation(self) -> np.ndarray:
        """[U] DP-SGD steps each client runs per round it takes part in."""
        if self.client_steps is not None:
            return self.client_steps
        return np.full(self.num_clients, self.local_steps, np.int64)

    def client_deltas(self, participations: np.ndarray) -> np.ndarray:
        """[U] record-level delta of every client: the target plus its buffer overflows' share."""
        eps = self.client_epsilons(participations)
        return np.array([min(1.0, self.delta + overflow_delta(e, int(k) * int(s), float(p)))
                         for e, k, s, p in zip(eps, participations, self.steps_per_participation,
                                               self.record_overflow)])

    def record_epsilon(self, participations: np.ndarray) -> float:
        """Max over clients of the record-level epsilon after the given participations."""
        return float(self.client_epsilons(participations).max(initial=0.0))

    def user_epsilon(self, rounds: int) -> float:
        if self.user_cohort is None or rounds == 0:
            return 0.0
        return _cached_user_epsilon(self.user_noise_multiplier, self.num_clients, self.user_cohort, rounds,
                                    self.delta, self.accountant, self.client_sampling)

    def check(self, cohort: np.ndarray) -> None:
        """Raises :class:`BudgetExceeded` if running the next round with ``cohort`` would exceed a target."""
        after = self.participations.copy()
        after[cohort] += 1
        record = self.record_epsilon(after)
        if self.target_epsilon is not None and record > self.target_epsilon * (1 + 1e-9):
            raise BudgetExceeded(
                f"privacy budget: round {self.rounds_done + 1} would raise record-level epsilon to "
                f"{record:.4f} > target {self.target_epsilon} (delta {self.delta}); stopping before it"
            )
        user = self.user_epsilon(self.rounds_done + 1)
        if self.user_target_epsilon is not None and user > self.user_target_epsilon * (1 + 1e-9):
            raise BudgetExceeded(
                f"privacy budget: round {self.rounds_done + 1} would raise user-level epsilon to "
                f"{user:.4f} > target {self.user_target_epsilon} (delta {self.delta}); stopping before it"
            )

    def commit(self, cohort: np.ndarray) -> dict:
        """Records a finished round with the clients that took part; returns the metrics to log:
        ``epsilon`` / ``delta`` (worst client, record level) and ``user_epsilon`` / ``user_delta``
        (:meth:`report`)."""
        self.participations[cohort] += 1
        self.rounds_done += 1
        return self.report()

    def report(self) -> dict:
        """The guarantees spent so far, as :meth:`commit` logs them."""
        out = {}
        if self.client_rates is not None:
            out["epsilon"] = self.record_epsilon(self.participations)
            out["delta"] = float(self.client_deltas(self.participations).max())
        if self.user_cohort is not None:
            out["user_epsilon"] = self.user_epsilon(self.rounds_done)
            out["user_delta"] = min(1.0, self.delta + overflow_delta(out["user_epsilon"], self.rounds_done,
                                                                     self.user_overflow))
        return out
