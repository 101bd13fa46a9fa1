"""Record-level DP-SGD: per-example clipped, noised gradients (JAX, pure function).

One call privatises one step of one client: per-example gradients by ``jax.vmap`` over the
example axis, per-example L2 clipping, masked sum, Gaussian noise, division by the expected
batch size. Everything is static-shape and jit-able; the engine vmaps it over a client axis
(params, batch, example_mask and key all batched along axis 0) inside one ``jax.jit``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax.privacy._checks import check_non_negative, check_positive, concrete_value
from fedlora_jax.privacy.clipping import clip_scale, zero_non_finite
from fedlora_jax.privacy.noise import gaussian_noise_like


class GradientStats(NamedTuple):
    """Diagnostics of one private_gradient call, over real (mask 1) examples only.

    They are computed from the raw data and are NOT differentially private: log them for
    debugging, never release them.

    Attributes:
      mean_loss: mean per-example loss, scalar.
      mean_grad_norm: mean pre-clipping L2 norm of the per-example gradient over the whole
        (grad-masked) tree, scalar.
      fraction_clipped: fraction of examples whose gradient was scaled down (with per-layer
        clipping: at least one leaf was), scalar in [0, 1].
      num_examples: realised number of real examples, float scalar.
      num_non_finite: real examples whose gradient of a trained leaf held NaN or inf (those
        entries are zeroed before clipping), int32 scalar.
    """

    mean_loss: jax.Array
    mean_grad_norm: jax.Array
    fraction_clipped: jax.Array
    num_examples: jax.Array
    num_non_finite: jax.Array


def _per_leaf_squared_norms(per_example_grads) -> list[jax.Array]:
    """Squared L2 norm of every leaf of every example: a list of [b] float32 arrays."""
    return [
        jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree.leaves(per_example_grads)
    ]


def _num_active_leaves(tree, grad_mask) -> jax.Array:
    """Number of leaves of ``tree`` that can carry gradient (grad_mask not all zero); at least 1."""
    if grad_mask is None:
        return jnp.float32(len(jax.tree.leaves(tree)))
    active = [jnp.any(jnp.asarray(m) != 0).astype(jnp.float32) for m in jax.tree.leaves(grad_mask)]
    return jnp.maximum(sum(active, jnp.float32(0.0)), 1.0)


def private_gradient(
    loss_fn: Callable,
    params,
    batch,
    example_mask: jax.Array,
    key: jax.Array,
    *,
    clip_norm,
    noise_multiplier,
    expected_batch_size,
    per_layer: bool = False,
    grad_mask=None,
):
    """DP-SGD gradient of one client's batch: clip per example, sum, add noise, normalise.

    Computes ``(sum_i m_i * clip(g_i) + N(0, sigma^2 C^2 I)) / expected_batch_size`` where
    ``g_i = grad(loss_fn)(params, example_i)`` (times ``grad_mask``) and ``m_i`` is the example
    mask. The sum over a Poisson sample has L2 sensitivity C under adding or removing one example,
    so with Poisson sampling (:func:`fedlora_jax.privacy.poisson_sample`) every call is one step of
    the sampled Gaussian mechanism that :func:`fedlora_jax.privacy.epsilon` accounts for. The
    divisor is the expected batch size, not the realised count: the realised count depends on the
    data and would itself leak.

    Clipping modes:
      * ``per_layer=False``: each example's gradient is scaled to L2 norm <= C over the whole
        flattened tree.
      * ``per_layer=True``: each leaf is clipped separately to C / sqrt(L), L the number of leaves
        that can carry gradient (leaves whose grad_mask is not all zero), so the whole-tree norm
        is still <= C and the same noise std sigma * C (on every coordinate) gives the same
        guarantee. This equalises layers with very different gradient scales at the cost of
        clipping each leaf harder.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` loss of ONE example, where ``example`` is
        ``batch`` with its leading axis removed. Frozen weights are closed over by the caller.
      params: the trainable pytree (LoRA factors + head), no batch axis.
      batch: pytree whose leaves have a leading example axis [b, ...].
      example_mask: [b], 1 (or True) for a real sampled example, 0 for padding. Padding examples
        contribute nothing, whatever their values.
      key: PRNG key of this step (one per client per step).
      clip_norm: C > 0, the per-example L2 clipping bound (scalar, may be traced).
      noise_multiplier: sigma >= 0; the noise std per coordinate is sigma * C before dividing.
      expected_batch_size: > 0, the expected number of sampled examples (q * n for Poisson
        sampling); the divisor of the noisy sum.
      per_layer: clip each leaf to C / sqrt(L) instead of the whole tree to C (static bool).
      grad_mask: optional pytree with the structure of ``params`` whose leaves (0/1 floats, a
        scalar or an array of the leaf's shape) multiply every per-example gradient and the noise.
        A leaf masked by 0 (e.g. the frozen A factor of FFA-LoRA) gets exactly zero gradient and
        zero noise, and its norm does not count towards clipping.

    Returns:
      ``(noisy_grad, stats)``: ``noisy_grad`` has the structure, shapes and dtypes of ``params``;
      ``stats`` is a :class:`GradientStats` of scalars (not private, for logging).

    Raises:
      ValueError: if a concrete clip_norm or expected_batch_size is not > 0, or a concrete
        noise_multiplier is negative.
    """
    losses, per_example_grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)
    return privatize(per_example_grads, losses, example_mask, key, clip_norm=clip_norm,
                     noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                     per_layer=per_layer, grad_mask=grad_mask)


def privatize(
    per_example_grads,
    losses: jax.Array,
    example_mask: jax.Array,
    key: jax.Array,
    *,
    clip_norm,
    noise_multiplier,
    expected_batch_size,
    per_layer: bool = False,
    grad_mask=None,
):
    """The DP-SGD mechanism on given per-example gradients: clip, sum, add noise, normalise.

    :func:`private_gradient` computes the per-example gradients by ``vmap``; the book-keeping path
    (:func:`fedlora_jax.privacy.bookkeeping.per_example_gradients`) computes them from one
    batched backward pass. Arguments as in :func:`private_gradient`, with ``per_example_grads`` a
    tree of [b, ...] leaves and ``losses`` the [b] per-example losses.
    """
    check_positive("clip_norm", clip_norm)
    check_non_negative("noise_multiplier", noise_multiplier)
    check_positive("expected_batch_size", expected_batch_size)
    trained = jax.tree.leaves(grad_mask) if grad_mask is not None else [1.0] * len(jax.tree.leaves(per_example_grads))
    finite = [jnp.all(jnp.isfinite(g).reshape(g.shape[0], -1), axis=1) | (jnp.asarray(m) == 0).all()
              for g, m in zip(jax.tree.leaves(per_example_grads), trained)]
    example_finite = jnp.all(jnp.stack(finite), axis=0)  # [b]
    per_example_grads = zero_non_finite(per_example_grads)
    if grad_mask is not None:
        per_example_grads = jax.tree.map(lambda g, m: (g * m).astype(g.dtype), per_example_grads, grad_mask)

    mask = jnp.asarray(example_mask).astype(jnp.float32)
    squared_norms = _per_leaf_squared_norms(per_example_grads)
    grad_norms = jnp.sqrt(sum(squared_norms, jnp.zeros_like(mask)))
    if per_layer:
        leaf_clip_norm = clip_norm / jnp.sqrt(_num_active_leaves(per_example_grads, grad_mask))
        leaf_norms = [jnp.sqrt(sq) for sq in squared_norms]
        leaf_scales = [clip_scale(norm, leaf_clip_norm) * mask for norm in leaf_norms]
        was_clipped = jnp.any(jnp.stack([norm > leaf_clip_norm for norm in leaf_norms]), axis=0)
    else:
        scale = clip_scale(grad_norms, clip_norm) * mask
        leaf_scales = [scale] * len(squared_norms)
        was_clipped = grad_norms > clip_norm

    grad_leaves, treedef = jax.tree.flatten(per_example_grads)
    summed = jax.tree.unflatten(
        treedef,
        [jnp.tensordot(s.astype(g.dtype), g, axes=1) for s, g in zip(leaf_scales, grad_leaves)],
    )
    if concrete_value(noise_multiplier) != 0.0:
        noise = gaussian_noise_like(key, summed, noise_multiplier * clip_norm, grad_mask)
        summed = jax.tree.map(lambda s, n: s + n, summed, noise)
    noisy_grad = jax.tree.map(lambda s: (s / expected_batch_size).astype(s.dtype), summed)

    is_real = mask > 0
    num_examples = jnp.sum(mask)
    denominator = jnp.maximum(num_examples, 1.0)

    def masked_mean(values):  # where, not a product: padding rows may hold inf or NaN
        return jnp.sum(jnp.where(is_real, values.astype(jnp.float32), 0.0)) / denominator

    stats = GradientStats(
        mean_loss=masked_mean(losses),
        mean_grad_norm=masked_mean(grad_norms),
        fraction_clipped=masked_mean(was_clipped),
        num_examples=num_examples,
        num_non_finite=jnp.sum(is_real & ~example_finite).astype(jnp.int32),
    )
    return noisy_grad, stats
