"""Host-side privacy bookkeeping of a run: noise calibration, per-client epsilon, budget stops.

Record level: client u runs DP-SGD with sampling rate q_u = min(1, b / n_u) for ``local_steps``
steps in every round it takes part in, so after k_u rounds its guarantee is that of
``k_u * local_steps`` compositions of the sampled Gaussian mechanism with rate q_u. The run
reports the maximum over clients. Calibration from a target picks sigma for the worst case:
the largest q_u taking part in every round.

User level: each round samples K of U clients and adds noise once to the clipped sum of their
updates, i.e. ``rounds`` compositions with rate K / U.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fedlora_jax.privacy.accounting import epsilon, noise_multiplier_for


class BudgetExceeded(RuntimeError):
    """The next round would push some guarantee past its target epsilon."""


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(sigma: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    return epsilon(sigma, rate, steps, delta, accountant)


@dataclasses.dataclass
class PrivacyLedger:
    """Tracks participations and the epsilons they imply.

    Attributes:
      client_rates: [U] record-level sampling rate of each client (None when record level is off).
      local_steps: DP-SGD steps per participation.
      noise_multiplier / target_epsilon: record level.
      user_rate: K / U (None when user level is off); user_noise_multiplier / user_target_epsilon.
      delta, accountant: shared.
      participations: [U] rounds each client has taken part in so far.
      rounds_done: rounds completed.
    """

    client_rates: np.ndarray | None
    local_steps: int
    noise_multiplier: float | None
    target_epsilon: float | None
    user_rate: float | None
    user_noise_multiplier: float | None
    user_target_epsilon: float | None
    delta: float
    accountant: str
    participations: np.ndarray
    rounds_done: int = 0

    @classmethod
    def create(cls, privacy, num_train: np.ndarray, batch_size: int, local_steps: int, rounds: int,
               cohort_size: int) -> "PrivacyLedger":
        """Builds the ledger, calibrating any noise multiplier given only as a target epsilon."""
        num_clients = len(num_train)
        rates = np.minimum(1.0, batch_size / np.maximum(num_train, 1)) if privacy.record_level else None
        sigma = privacy.noise_multiplier
        if privacy.record_level and sigma is None:
            sigma = noise_multiplier_for(privacy.target_epsilon, float(rates.max()), rounds * local_steps,
                                         privacy.delta, privacy.accountant)
        user_rate = cohort_size / num_clients if privacy.user_level else None
        user_sigma = privacy.user_noise_multiplier
        if privacy.user_level and user_sigma is None:
            user_sigma = noise_multiplier_for(privacy.user_target_epsilon, user_rate, rounds, privacy.delta,
                                              privacy.accountant)
        return cls(rates, local_steps, sigma if privacy.record_level else None,
                   privacy.target_epsilon if privacy.record_level else None, user_rate,
                   user_sigma if privacy.user_level else None,
                   privacy.user_target_epsilon if privacy.user_level else None,
                   privacy.delta, privacy.accountant, np.zeros(num_clients, np.int64))

    @property
    def active(self) -> bool:
        """Whether any guarantee is tracked (record or user level)."""
        return self.client_rates is not None or self.user_rate is not None

    def record_epsilon(self, participations: np.ndarray) -> float:
        """Max over clients of the record-level epsilon after the given participations."""
        if self.client_rates is None:
            return 0.0
        pairs = {(float(q), int(k) * self.local_steps) for q, k in zip(self.client_rates, participations) if k > 0}
        return max((_cached_epsilon(self.noise_multiplier, q, steps, self.delta, self.accountant) for q, steps in pairs),
                   default=0.0)

    def user_epsilon(self, rounds: int) -> float:
        if self.user_rate is None or rounds == 0:
            return 0.0
        return _cached_epsilon(self.user_noise_multiplier, self.user_rate, rounds, self.delta, self.accountant)

    def check(self, cohort: np.ndarray) -> None:
        """Raises :class:`BudgetExceeded` if running the next round with ``cohort`` would exceed a target."""
        after = self.participations.copy()
        after[cohort] += 1
        record = self.record_epsilon(after)
        if self.target_epsilon is not None and record > self.target_epsilon * (1 + 1e-9):
            raise BudgetExceeded(f"privacy budget: round {self.rounds_done + 1} would raise record-level epsilon to "
                                 f"{record:.4f} > target {self.target_epsilon} (delta {self.delta}); stopping before it")
        user = self.user_epsilon(self.rounds_done + 1)
        if self.user_target_epsilon is not None and user > self.user_target_epsilon * (1 + 1e-9):
            raise BudgetExceeded(f"privacy budget: round {self.rounds_done + 1} would raise user-level epsilon to "
                                 f"{user:.4f} > target {self.user_target_epsilon} (delta {self.delta}); stopping before it")

    def commit(self, cohort: np.ndarray) -> dict:
        """Records a finished round; returns the metrics to log."""
        self.participations[cohort] += 1
        self.rounds_done += 1
        out = {}
        if self.client_rates is not None:
            out["epsilon"] = self.record_epsilon(self.participations)
        if self.user_rate is not None:
            out["user_epsilon"] = self.user_epsilon(self.rounds_done)
        return out
