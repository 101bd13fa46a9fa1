"""Privacy accounting for the subsampled Gaussian mechanism (host-side, numpy).

Both DP modes of fedlora_jax release, at every step, a sum of L2-clipped contributions plus
Gaussian noise of standard deviation ``noise_multiplier * clip_norm``. Two ways of choosing the
contributions are accounted for:

* Poisson sampling (record level always; user level with ``client_sampling="poisson"``): each
  unit (an example in DP-SGD, a client in DP-FedAvg) is included independently with probability
  ``sampling_rate``. ``steps`` releases are the dp-accounting event
  ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`` under add-or-remove-one neighbours.
* Fixed-size sampling without replacement (user level with ``client_sampling="fixed"``: exactly
  K of U clients per round). Its analysis needs the replace-one relation (U is public), under
  which one client changes the clipped sum by up to 2 S, so the event is
  ``SelfComposed(SampledWithoutReplacement(U, K, Gaussian(sigma / 2)), steps)`` (RDP only).

Either is evaluated with the RDP accountant (the TF-Privacy numbers) or the tighter PLD
accountant (Poisson only).

These functions run on the host between rounds; nothing here is traced by JAX.
"""

from __future__ import annotations

import contextlib
import logging
import math

import dp_accounting
from dp_accounting import mechanism_calibration, pld, rdp

ACCOUNTANTS = ("rdp", "pld")
CLIENT_SAMPLINGS = ("fixed", "poisson")
_REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE

# Absolute tolerance of the noise multiplier returned by noise_multiplier_for.
_CALIBRATION_TOLERANCE = 1e-4
# The without-replacement RDP bound divides by sigma: its calibration searches from here.
_FIXED_COHORT_MIN_SIGMA = 1e-2


@contextlib.contextmanager
def _quiet_absl():
    """Keeps dp-accounting's absl warnings (orders it skips for small clients) off the console."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_sampling_rate(sampling_rate: float) -> None:
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _make_accountant(accountant: str, replace_one: bool = False) -> dp_accounting.PrivacyAccountant:
    if replace_one:
        return rdp.RdpAccountant(neighboring_relation=_REPLACE_ONE)
    if accountant == "rdp":
        return rdp.RdpAccountant()
    return pld.PLDAccountant()


def sampled_gaussian_event(
    noise_multiplier: float, sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
    """The dp-accounting event of ``steps`` Poisson-subsampled Gaussian releases.

    Args:
      noise_multiplier: sigma, the noise standard deviation divided by the L2 sensitivity (> 0).
      sampling_rate: q, the probability that each unit (example or client) is included in a step,
        in (0, 1]. With q = 1 the event is the plain (unsampled) Gaussian mechanism.
      steps: number of self-composed releases (>= 0).

    Returns:
      ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``.
    """
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step_event = (
        gaussian if sampling_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(step_event, steps)


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian releases at the given delta.

    Args:
      noise_multiplier: sigma >= 0 (noise std / clip norm). sigma = 0 with steps > 0 gives inf.
      sampling_rate: q in (0, 1]: per-step inclusion probability of one unit (for record-level
        DP-SGD on a client: expected batch size / that client's number of examples).
      steps: number of releases (>= 0); steps = 0 gives epsilon 0.
      delta: target delta in (0, 1).
      accountant: "rdp" (dp_accounting.rdp.RdpAccountant with its default orders, which
        reproduces TF-Privacy's compute_dp_sgd_privacy) or "pld"
        (dp_accounting.pld.PLDAccountant, tighter).

    Returns:
      The (epsilon, delta)-DP guarantee's epsilon as a Python float (possibly ``math.inf``).

    Raises:
      ValueError: on an unknown accountant or an argument outside its range.
    """
    _check_accountant(accountant)
    _check_sampling_rate(sampling_rate)
    return _epsilon_of(lambda sigma: sampled_gaussian_event(sigma, sampling_rate, steps), noise_multiplier, steps,
                       delta, accountant)


def _epsilon_of(make_event, noise_multiplier: float, steps: int, delta: float, accountant: str,
                replace_one: bool = False) -> float:
    """Epsilon of ``make_event(noise_multiplier)`` (``steps`` releases) at ``delta``."""
    if not noise_multiplier >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    _check_steps(steps)
    _check_delta(delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    privacy_accountant = _make_accountant(accountant, replace_one)
    with _quiet_absl():
        privacy_accountant.compose(make_event(noise_multiplier))
        return float(privacy_accountant.get_epsilon(delta))


def _calibrate(make_event, target_epsilon: float, steps: int, delta: float, accountant: str,
               replace_one: bool = False, lowest_sigma: float = 0.0) -> float:
    """Smallest sigma (to 1e-4) with ``make_event(sigma)``'s epsilon at most the target."""
    if not 0.0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    _check_steps(steps)
    _check_delta(delta)
    if steps == 0:
        return 0.0
    with _quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            make_fresh_accountant=lambda: _make_accountant(accountant, replace_one),
            make_event_from_param=make_event,
            target_epsilon=target_epsilon,
            target_delta=delta,
            bracket_interval=mechanism_calibration.LowerEndpointAndGuess(lowest_sigma, 1.0),
            tol=_CALIBRATION_TOLERANCE,
        )
    return float(sigma)


def noise_multiplier_for(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier (to 1e-4) whose ``epsilon`` does not exceed the target.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (a bracketed root search); the returned
    sigma always satisfies ``epsilon(sigma, ...) <= target_epsilon``.

    Args:
      target_epsilon: the privacy budget, a finite epsilon > 0.
      sampling_rate: q in (0, 1], as in :func:`epsilon`.
      steps: number of releases (>= 0); with steps = 0 no noise is needed and 0.0 is returned.
      delta: target delta in (0, 1).
      accountant: "rdp" or "pld", as in :func:`epsilon`.

    Returns:
      The noise multiplier sigma as a Python float.

    Raises:
      ValueError: on an unknown accountant or an argument outside its range.
    """
    _check_accountant(accountant)
    _check_sampling_rate(sampling_rate)
    return _calibrate(lambda sigma: sampled_gaussian_event(sigma, sampling_rate, steps), target_epsilon, steps, delta,
                      accountant)


def fixed_cohort_event(noise_multiplier: float, num_clients: int, cohort_size: int,
                       rounds: int) -> dp_accounting.DpEvent:
    """``rounds`` releases of a clipped sum over exactly ``cohort_size`` of ``num_clients`` clients.

    Sampling without replacement is analysed under the replace-one relation (Wang, Balle and
    Kasiviswanathan, 2019), where replacing one client's update moves the clipped sum by up to
    2 S: the noise std sigma * S is sigma / 2 in units of that sensitivity.
    """
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2.0)
    step_event = (gaussian if cohort_size == num_clients
                  else dp_accounting.SampledWithoutReplacementDpEvent(num_clients, cohort_size, gaussian))
    return dp_accounting.SelfComposedDpEvent(step_event, rounds)


def _check_cohort(num_clients: int, cohort_size: int, accountant: str, client_sampling: str) -> None:
    _check_accountant(accountant)
    if client_sampling not in CLIENT_SAMPLINGS:
        raise ValueError(f"client_sampling must be one of {CLIENT_SAMPLINGS}, got {client_sampling!r}")
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort_size must be in [1, num_clients={num_clients}], got {cohort_size!r}")
    if client_sampling == "fixed" and accountant == "pld":
        raise ValueError("the PLD accountant cannot account fixed-size cohorts (sampling without replacement); "
                         "use accountant 'rdp' or Poisson cohorts")


def user_level_epsilon(
    noise_multiplier: float,
    num_clients: int,
    cohort_size: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    client_sampling: str = "poisson",
) -> float:
    """Epsilon of user-level DP-FedAvg after ``rounds`` rounds; the unit of privacy is a client.

    In DP-FedAvg (:func:`fedlora_jax.privacy.noisy_mean_of_updates`) each included client's
    update is clipped to L2 norm S and N(0, sigma^2 S^2) is added once to their sum. The
    guarantee protects everything a client contributes and holds for every client; which one it
    is depends on how the cohort is drawn:

    * ``"poisson"``: each client included independently with q = cohort_size / num_clients
      (cohorts vary in size; the mean divides by q U). Add-or-remove-one neighbours:
      ``epsilon(noise_multiplier, q, rounds, delta, accountant)``.
    * ``"fixed"``: exactly ``cohort_size`` distinct clients, uniformly (what
      ``Federation.sample_cohort`` does by default). Replace-one neighbours,
      :func:`fixed_cohort_event`, RDP accountant only.

    Args:
      noise_multiplier: sigma >= 0 of the server-side noise (noise std / S).
      num_clients: U, the number of clients (public).
      cohort_size: K, the (expected) number of clients per round, 1 <= K <= U.
      rounds: number of rounds run (>= 0).
      delta: target delta in (0, 1), usually below 1 / number of clients.
      accountant: "rdp" or "pld" (Poisson only).
      client_sampling: "poisson" or "fixed".

    Returns:
      Epsilon as a Python float.

    Raises:
      ValueError: on an argument outside its range, or the PLD accountant with fixed cohorts.
    """
    _check_cohort(num_clients, cohort_size, accountant, client_sampling)
    if client_sampling == "poisson":
        return epsilon(noise_multiplier, cohort_size / num_clients, rounds, delta, accountant)
    return _epsilon_of(lambda sigma: fixed_cohort_event(sigma, num_clients, cohort_size, rounds), noise_multiplier,
                       rounds, delta, accountant, replace_one=True)


def user_level_noise_multiplier_for(
    target_epsilon: float,
    num_clients: int,
    cohort_size: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    client_sampling: str = "poisson",
) -> float:
    """Smallest server noise multiplier (to 1e-4) whose :func:`user_level_epsilon` does not
    exceed the target; arguments as there and in :func:`noise_multiplier_for`."""
    _check_cohort(num_clients, cohort_size, accountant, client_sampling)
    if client_sampling == "poisson":
        return noise_multiplier_for(target_epsilon, cohort_size / num_clients, rounds, delta, accountant)
    return _calibrate(lambda sigma: fixed_cohort_event(sigma, num_clients, cohort_size, rounds), target_epsilon,
                      rounds, delta, accountant, replace_one=True, lowest_sigma=_FIXED_COHORT_MIN_SIGMA)
