"""Canary audits of the DP mechanisms: an empirical lower bound on epsilon beside the accountant's.

One-run audit (Steinke, Nasr and Jagielski 2023): m canaries, each included independently with
probability 1/2, one run of the mechanism, a score per canary; the more reliably the scores tell
included ("in") from excluded ("out") canaries, the larger the epsilon any mechanism that lets
them do so must have. The statistics are jax-privacy's
(:class:`jax_privacy.auditing.CanaryScoreAuditor`); this module inserts and scores canaries.

* Record level (:func:`record_level_scores`): crafted canary *gradients* (Nasr et al. 2023) of
  norm ``canary_norm`` in random directions of the trainable tree, each an example of the audited
  client: Poisson-sampled with the client's rate every step, clipped, summed and noised by
  :func:`fedlora_jax.privacy.dpsgd.privatize`, the engine's DP-SGD step. DP must hold for every
  example, so a gradient is the strongest canary the threat model allows; the other examples'
  gradients are fixed and known to the adversary and are left out (subtracted). Score of canary i:
  ``<sum_t release_t, c_i> / C``, what the client's SGD upload (its update) reveals about it.
* User level (:func:`user_level_scores`): canary clients whose update is a random direction of
  norm ``canary_norm`` (Andrew et al. 2024), each taking part in a round with the cohort rate,
  clipped, summed and noised by :func:`fedlora_jax.privacy.noisy_mean_of_updates`. Score: cosine
  of the released model update (the sum of the rounds' noisy means) with each canary direction.

Shapes: ``directions`` is a tree like the trainable tree with a leading canary axis [m, ...],
each canary of unit L2 norm over the tree.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.privacy.dpsgd import privatize
from fedlora_jax.privacy.sampling import poisson_sample
from fedlora_jax.privacy.user_level import noisy_mean_of_updates

# Confidence of the reported bound: it exceeds the true epsilon with probability at most 5%.
SIGNIFICANCE = 0.05


class Mechanism(NamedTuple):
    """What runs (not what is accounted): clip norm C, noise multiplier sigma (noise std sigma C),
    the rate q at which each canary takes part in a release, the number of releases, and whether
    contributions are clipped (False only in tests of a broken mechanism)."""

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    releases: int
    clip: bool = True


def canary_directions(key: jax.Array, num_canaries: int, template, mask=None):
    """Unit directions in the space of ``template``'s leaves: leaves [m, ...], each canary of L2
    norm 1 over the whole tree; leaves whose ``mask`` (tree of 0/1 scalars) is 0 stay zero.

    With m at most the number of unmasked coordinates the directions are orthonormal (QR of a
    Gaussian matrix), so one canary's contribution never moves another's score; beyond that they
    are independent random unit vectors.
    """
    leaves, treedef = jax.tree.flatten(template)
    masks = jax.tree.leaves(mask) if mask is not None else [1.0] * len(leaves)
    active = jnp.concatenate([jnp.broadcast_to(jnp.asarray(m, jnp.float32), leaf.shape).reshape(-1)
                              for leaf, m in zip(leaves, masks)])  # [D]
    gaussian = jax.random.normal(key, (active.size, num_canaries), jnp.float32) * active[:, None]
    if num_canaries <= int(jnp.sum(active)):
        gaussian = jnp.linalg.qr(gaussian)[0] * active[:, None]
    flat = (gaussian / jnp.maximum(jnp.linalg.norm(gaussian, axis=0), 1e-12)).T  # [m, D]
    sizes = [leaf.size for leaf in leaves]
    parts = jnp.split(flat, list(np.cumsum(sizes)[:-1]), axis=1)
    return jax.tree.unflatten(treedef, [x.reshape((num_canaries,) + leaf.shape) for x, leaf in zip(parts, leaves)])


def canary_inclusion(key: jax.Array, num_canaries: int) -> np.ndarray:
    """[m] bool: each canary included independently with probability 1/2."""
    return np.asarray(jax.random.bernoulli(key, 0.5, (num_canaries,)))


def _dots(tree, directions) -> jax.Array:
    """[m] inner products of one tree with each of the m directions."""
    return sum(jnp.tensordot(d.reshape(d.shape[0], -1), x.reshape(-1), axes=1)
               for x, d in zip(jax.tree.leaves(tree), jax.tree.leaves(directions)))


def _participation(key: jax.Array, included: jax.Array, rate: float) -> jax.Array:
    """[m] float: which included canaries take part in one release (Poisson, rate q)."""
    m = included.shape[0]
    indices, mask, _ = poisson_sample(key, m, rate, m, m)
    return jnp.zeros(m, jnp.float32).at[indices].add(mask.astype(jnp.float32)) * included


def _unclipped(mechanism: Mechanism) -> tuple[float, float]:
    """(clip norm, noise multiplier) to pass so nothing is clipped but the noise std stays sigma C."""
    if mechanism.clip:
        return mechanism.clip_norm, mechanism.noise_multiplier
    huge = 1e9 * mechanism.clip_norm
    return huge, mechanism.noise_multiplier * mechanism.clip_norm / huge


def record_level_scores(key: jax.Array, directions, included, mechanism: Mechanism, canary_norm: float,
                        per_layer: bool = False, grad_mask=None) -> np.ndarray:
    """Scores of gradient canaries after ``mechanism.releases`` DP-SGD steps of one client.

    Args:
      key: PRNG key of the run.
      directions: canary directions (:func:`canary_directions`), leaves [m, ...].
      included: [m] bool, the canaries in the client's data.
      mechanism: the DP-SGD step that runs (C, sigma, the client's rate q, steps).
      canary_norm: L2 norm of each canary gradient (above C, so that clipping matters).
      per_layer, grad_mask: as :func:`fedlora_jax.privacy.private_gradient`.

    Returns:
      [m] float64 scores ``<sum_t release_t, c_i> / C``; in-canaries score about ``q * steps``
      higher than out-canaries, with noise std ``sigma * sqrt(steps)``.
    """
    clip_norm, noise_multiplier = _unclipped(mechanism)
    gradients = jax.tree.map(lambda d: canary_norm * d, directions)
    losses = jnp.zeros(jax.tree.leaves(directions)[0].shape[0])
    included = jnp.asarray(included, jnp.float32)

    def step(total, step_key):
        sample_key, noise_key = jax.random.split(step_key)
        mask = _participation(sample_key, included, mechanism.sampling_rate)
        released, _ = privatize(gradients, losses, mask, noise_key, clip_norm=clip_norm,
                                noise_multiplier=noise_multiplier, expected_batch_size=1.0, per_layer=per_layer,
                                grad_mask=grad_mask)
        return jax.tree.map(jnp.add, total, released), None

    zero = jax.tree.map(lambda d: jnp.zeros(d.shape[1:], d.dtype), directions)
    total, _ = jax.jit(lambda k: jax.lax.scan(step, zero, jax.random.split(k, mechanism.releases)))(key)
    return np.asarray(_dots(total, directions), np.float64) / mechanism.clip_norm


def user_level_scores(key: jax.Array, directions, included, mechanism: Mechanism, canary_norm: float,
                      expected_clients: float, noise_mask=None) -> np.ndarray:
    """Cosines of the released model update with canary-client directions after
    ``mechanism.releases`` rounds of user-level DP-FedAvg.

    Args:
      key: PRNG key of the run.
      directions: canary clients' update directions, leaves [m, ...].
      included: [m] bool, the canary clients in the federation.
      mechanism: the server's mechanism (S, sigma, the cohort rate K / U, rounds).
      canary_norm: L2 norm of each canary client's update (above S).
      expected_clients: the divisor of the noisy mean (K).
      noise_mask: as :func:`fedlora_jax.privacy.noisy_mean_of_updates`.

    Returns:
      [m] float64 cosines in [-1, 1].
    """
    clip_norm, noise_multiplier = _unclipped(mechanism)
    updates = jax.tree.map(lambda d: canary_norm * d, directions)
    included = jnp.asarray(included, jnp.float32)

    def round_(total, round_key):
        sample_key, noise_key = jax.random.split(round_key)
        weights = _participation(sample_key, included, mechanism.sampling_rate)
        released = noisy_mean_of_updates(updates, weights, clip_norm, noise_multiplier, noise_key, expected_clients,
                                          noise_mask)
        return jax.tree.map(jnp.add, total, released), None

    zero = jax.tree.map(lambda d: jnp.zeros(d.shape[1:], d.dtype), directions)
    total, _ = jax.jit(lambda k: jax.lax.scan(round_, zero, jax.random.split(k, mechanism.releases)))(key)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(total)))
    return np.asarray(_dots(total, directions) / jnp.maximum(norm, 1e-30), np.float64)


def epsilon_lower_bound(scores: np.ndarray, included: np.ndarray, delta: float,
                        significance: float = SIGNIFICANCE) -> float:
    """One-run lower bound on epsilon at ``delta`` (jax-privacy's ``epsilon_one_run``, Bonferroni
    over thresholds): holds with confidence ``1 - significance``."""
    from jax_privacy.auditing import CanaryScoreAuditor

    scores, included = np.asarray(scores), np.asarray(included, bool)
    auditor = CanaryScoreAuditor(scores[included], scores[~included])
    return float(auditor.epsilon_one_run(significance, delta))


def largest_certifiable(included: np.ndarray, delta: float, significance: float = SIGNIFICANCE) -> float:
    """The bound of a perfect attack on these canaries (every in-canary above every out-canary):
    the largest epsilon ``len(included)`` canaries can certify at this delta and confidence."""
    included = np.asarray(included, bool)
    perfect = np.where(included, 1.0 + np.arange(included.size), -1.0)
    return epsilon_lower_bound(perfect, included, delta, significance)

