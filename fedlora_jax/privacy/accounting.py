"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (host-side, numpy).

Both DP modes of fedlora_jax release, at every step, a sum of L2-clipped contributions plus
Gaussian noise of standard deviation ``noise_multiplier * clip_norm``, where each contribution
(an example in DP-SGD, a client in DP-FedAvg) was included independently with probability
``sampling_rate``. The privacy loss of ``steps`` such releases is that of the dp-accounting event
``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`` under the add-or-remove-one
neighbouring relation, evaluated here with the RDP accountant (the TF-Privacy numbers) or the
tighter PLD accountant.

These functions run on the host between rounds; nothing here is traced by JAX.
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting import mechanism_calibration, pld, rdp

ACCOUNTANTS = ("rdp", "pld")

# Absolute tolerance of the noise multiplier returned by noise_multiplier_for.
_CALIBRATION_TOLERANCE = 1e-4


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


def _make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
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
    if not noise_multiplier >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    _check_sampling_rate(sampling_rate)
    _check_steps(steps)
    _check_delta(delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    privacy_accountant = _make_accountant(accountant)
    privacy_accountant.compose(sampled_gaussian_event(noise_multiplier, sampling_rate, steps))
    return float(privacy_accountant.get_epsilon(delta))


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
    if not 0.0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    _check_sampling_rate(sampling_rate)
    _check_steps(steps)
    _check_delta(delta)
    if steps == 0:
        return 0.0
    return float(
        dp_accounting.calibrate_dp_mechanism(
            make_fresh_accountant=lambda: _make_accountant(accountant),
            make_event_from_param=lambda sigma: sampled_gaussian_event(sigma, sampling_rate, steps),
            target_epsilon=target_epsilon,
            target_delta=delta,
            bracket_interval=mechanism_calibration.LowerEndpointAndGuess(0.0, 1.0),
            tol=_CALIBRATION_TOLERANCE,
        )
    )


def user_level_epsilon(
    noise_multiplier: float,
    client_sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of user-level DP-FedAvg: the same computation as :func:`epsilon`, per client.

    In DP-FedAvg (:func:`fedlora_jax.privacy.noisy_mean_of_updates`) the unit of privacy is a
    whole client: each round the server includes every client independently with probability
    ``client_sampling_rate`` (= expected cohort size / number of clients), clips each client's
    update to L2 norm S and adds N(0, sigma^2 S^2) to their sum. That is the Poisson-subsampled
    Gaussian mechanism with clients in place of examples, so the guarantee after ``rounds``
    rounds is ``epsilon(noise_multiplier, client_sampling_rate, rounds, delta, accountant)``. It
    protects everything a client contributes (all its examples) and holds for every client.

    Args:
      noise_multiplier: sigma >= 0 of the server-side noise (noise std / S).
      client_sampling_rate: per-round inclusion probability of a client, in (0, 1].
      rounds: number of rounds run (>= 0).
      delta: target delta in (0, 1), usually below 1 / number of clients.
      accountant: "rdp" or "pld".

    Returns:
      Epsilon as a Python float.

    Raises:
      ValueError: as :func:`epsilon`.
    """
    return epsilon(noise_multiplier, client_sampling_rate, rounds, delta, accountant)
