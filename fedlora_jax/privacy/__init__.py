"""Differential privacy for fedlora_jax: JAX mechanisms and host-side accounting.

Mechanisms (pure JAX, jit-able, vmappable over a client axis):
  * :func:`private_gradient`: record-level DP-SGD step of one client.
  * :func:`noisy_mean_of_updates` / :func:`clip_update`: user-level DP-FedAvg at the server.
  * :func:`poisson_sample` / :func:`shuffled_batch`: static-shape batch selection.
Accounting (host-side numpy + dp-accounting): :func:`epsilon`, :func:`noise_multiplier_for`,
:func:`user_level_epsilon`, :func:`poisson_buffer_size`, :func:`overflow_delta`.
Audits (canaries in the mechanisms, jax-privacy's one-run bound): :mod:`fedlora_jax.privacy.audit`.
See docs/privacy.md.
"""

from fedlora_jax.privacy.accounting import (
    ACCOUNTANTS,
    epsilon,
    noise_multiplier_for,
    sampled_gaussian_event,
    user_level_epsilon,
    user_level_noise_multiplier_for,
)
from fedlora_jax.privacy.clipping import clip_update, tree_l2_norm
from fedlora_jax.privacy.dpsgd import GradientStats, private_gradient
from fedlora_jax.privacy.noise import gaussian_noise_like
from fedlora_jax.privacy.sampling import (
    client_poisson_buffer_size,
    overflow_delta,
    overflow_probability,
    poisson_buffer_size,
    poisson_sample,
    shuffled_batch,
)
from fedlora_jax.privacy.user_level import noisy_mean_of_updates

__all__ = [
    "ACCOUNTANTS",
    "GradientStats",
    "client_poisson_buffer_size",
    "clip_update",
    "epsilon",
    "gaussian_noise_like",
    "noise_multiplier_for",
    "noisy_mean_of_updates",
    "overflow_delta",
    "overflow_probability",
    "poisson_buffer_size",
    "poisson_sample",
    "private_gradient",
    "sampled_gaussian_event",
    "shuffled_batch",
    "tree_l2_norm",
    "user_level_epsilon",
    "user_level_noise_multiplier_for",
]
