"""User-level DP-FedAvg aggregation at the server (JAX, pure functions).

The unit of privacy is a client: each client's whole update is clipped to L2 norm S, the clipped
updates are summed, Gaussian noise N(0, sigma^2 S^2) is added once to the sum and the result is
divided by the expected cohort size (McMahan et al., 2018, "Learning differentially private
recurrent language models"). Account for it with :func:`fedlora_jax.privacy.user_level_epsilon`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.privacy._checks import check_non_negative, check_positive, concrete_value
from fedlora_jax.privacy.clipping import clip_update
from fedlora_jax.privacy.noise import gaussian_noise_like


def noisy_mean_of_updates(
    updates,
    weights: jax.Array,
    clip_norm,
    noise_multiplier,
    key: jax.Array,
    expected_clients,
    noise_mask=None,
):
    """Clipped, noised, fixed-denominator mean of stacked client updates.

    Computes ``(sum_u w_u * clip(update_u, S) + N(0, sigma^2 S^2 I)) / expected_clients``.

    Sensitivity: weights are clamped to [0, 1], so adding or removing one client changes the
    weighted sum by at most S, and sigma is the noise multiplier the accountant needs. Use
    uniform weights (1 for every cohort member, 0 for empty padding slots) when user-level DP is
    on; data-size weights n_u / n_max are allowed (still bounded by 1) but need the denominator
    to be the expected total weight, and any weight derived from private data must itself be
    treated as part of the client's contribution.

    Args:
      updates: pytree whose leaves are stacked client updates with a leading client axis
        [U, ...] (e.g. B deltas [U, d_out, r] and A deltas [U, r, d_in]).
      weights: [U] per-client weights: 1 for a client in the cohort, 0 for a padding slot.
      clip_norm: S > 0, per-client L2 bound over the whole update tree (scalar, may be traced).
      noise_multiplier: sigma >= 0; noise std per coordinate of the sum is sigma * S.
      key: PRNG key of this round's aggregation.
      expected_clients: > 0, the expected cohort size (q * total clients, or the expected total
        weight); the divisor, independent of how many clients actually took part.
      noise_mask: optional tree like one client's update of 0/1 scalars (may be traced): leaves
        with 0 are not uploaded (e.g. FFA-LoRA's frozen A), carry zero update and get no noise.
        It must not depend on private data.

    Returns:
      A pytree like one client's update (leaves [...]) holding the noisy mean.

    Raises:
      ValueError: if a concrete clip_norm or expected_clients is not > 0 or a concrete
        noise_multiplier is negative.
    """
    check_positive("clip_norm", clip_norm)
    check_non_negative("noise_multiplier", noise_multiplier)
    check_positive("expected_clients", expected_clients)
    clipped = jax.vmap(clip_update, in_axes=(0, None))(updates, clip_norm)
    bounded_weights = jnp.clip(jnp.asarray(weights, jnp.float32), 0.0, 1.0)
    summed = jax.tree.map(lambda x: jnp.tensordot(bounded_weights.astype(x.dtype), x, axes=1), clipped)
    if concrete_value(noise_multiplier) != 0.0:
        noise = gaussian_noise_like(key, summed, noise_multiplier * clip_norm)
        if noise_mask is not None:
            noise = jax.tree.map(lambda n, m: n * jnp.asarray(m, n.dtype), noise, noise_mask)
        summed = jax.tree.map(lambda s, n: s + n, summed, noise)
    return jax.tree.map(lambda s: (s / expected_clients).astype(s.dtype), summed)
