"""L2 norms and clipping of pytrees (JAX, pure functions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.privacy._checks import check_positive


def zero_non_finite(tree):
    """Replaces NaN and +-inf entries by 0, leaf by leaf.

    Clipping bounds a contribution's norm only if the contribution is finite, so every
    mechanism applies this before clipping (as jax-privacy's ``clip_pytree(nan_safe=True)``).
    """
    return jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)), tree)


def tree_l2_norm(tree) -> jax.Array:
    """L2 norm of all leaves of ``tree`` flattened into one vector; a float32 scalar."""
    squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.float32(0.0)))


def clip_scale(norm: jax.Array, clip_norm) -> jax.Array:
    """The factor min(1, clip_norm / norm) that brings a vector of L2 norm ``norm`` to <= clip_norm.

    Args:
      norm: non-negative L2 norm(s), any shape.
      clip_norm: the bound C > 0 (scalar).

    Returns:
      Factors of the shape of ``norm``; exactly 1 where norm <= C, and C / norm elsewhere.
    """
    return clip_norm / jnp.maximum(norm, clip_norm)


def clip_update(update, clip_norm):
    """Scales ``update`` so that its L2 norm over the whole tree is at most ``clip_norm``.

    Non-finite entries are zeroed first (otherwise no norm bound would hold). An update already
    within the bound is returned unchanged.

    Args:
      update: a pytree of arrays (e.g. one client's model delta).
      clip_norm: the bound S > 0 (scalar, may be traced).

    Returns:
      A pytree of the same structure, shapes and dtypes with global L2 norm <= clip_norm.

    Raises:
      ValueError: if a concrete ``clip_norm`` is not > 0.
    """
    check_positive("clip_norm", clip_norm)
    update = zero_non_finite(update)
    scale = clip_scale(tree_l2_norm(update), clip_norm)
    return jax.tree.map(lambda x: (x * scale).astype(x.dtype), update)
