"""Gaussian noise shaped like a pytree (JAX, pure function).

JAX's threefry PRNG is reproducible but not a cryptographically secure source, and floating-point
Gaussian samples are open to the Mironov (2012) attack; see docs/privacy.md before deploying.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gaussian_noise_like(key: jax.Array, tree, stddev, mask=None):
    """Independent N(0, stddev^2) noise for every coordinate of ``tree``.

    Each leaf gets its own key from ``jax.random.split(key, num_leaves)``.

    Args:
      key: a PRNG key.
      tree: a pytree of arrays; only shapes and dtypes are used.
      stddev: the noise standard deviation (scalar, may be traced).
      mask: optional pytree with the structure of ``tree`` whose leaves broadcast to the
        corresponding leaf (0/1 floats); the noise is multiplied by it, so a leaf masked by 0
        receives exactly zero noise.

    Returns:
      A pytree with the structure, shapes and dtypes of ``tree``.
    """
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [
        (stddev * jax.random.normal(leaf_key, leaf.shape, jnp.float32)).astype(leaf.dtype)
        for leaf_key, leaf in zip(keys, leaves)
    ]
    noise = jax.tree.unflatten(treedef, noise)
    if mask is None:
        return noise
    return jax.tree.map(lambda n, m: (n * m).astype(n.dtype), noise, mask)
