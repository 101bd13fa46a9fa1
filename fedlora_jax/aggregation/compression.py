"""Compressed uploads: what the server decodes from one client's message, and the message's bytes.

Each scheme maps an array x (one uploaded leaf's update, any shape, n values) to the array the
server reconstructs, and counts exactly what travels:

* ``quantize`` (stochastic uniform quantization to b bits, QSGD-style): x is cut into blocks of
  ``block`` values; each block sends its scale s = max |x| (float32) and every value as one of
  the 2^b levels spread evenly over [-s, s], rounded up or down at random with the probabilities
  that make the reconstruction unbiased (E[x_hat] = x). Bytes: ceil(n b / 8) + 4 per block.
* ``topk``: the k = ceil(fraction n) entries of largest magnitude, as float32 values and int32
  indices; the rest are zero (biased). Bytes: 8 k.
* ``randk``: k entries drawn uniformly without replacement from a seed the server shares, so no
  indices travel, scaled by n / k (unbiased). Bytes: 4 k.

Pure functions of arrays and a PRNG key; vmap them over clients.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

SCHEMES = ("quantize", "topk", "randk")


@dataclasses.dataclass(frozen=True)
class Compression:
    """An upload compression scheme (static).

    kind: one of :data:`SCHEMES`.
    bits: quantize: bits per value (1-16).
    block: quantize: values per scale.
    fraction: topk / randk: the share of the values sent (0 < fraction <= 1).
    """

    kind: str
    bits: int = 8
    block: int = 64
    fraction: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEMES:
            raise ValueError(f"unknown compression {self.kind!r} (known: {', '.join(SCHEMES)})")

    def kept(self, size: int) -> int:
        """k, the values a sparsifying scheme sends of ``size``."""
        return max(1, min(size, math.ceil(self.fraction * size)))

    def roundtrip(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """What the server decodes from this client's message of ``x`` (same shape and dtype)."""
        if self.kind == "quantize":
            return stochastic_quantize(x, self.bits, self.block, key)
        if self.kind == "topk":
            return top_k(x, self.kept(x.size))
        return random_k(x, self.kept(x.size), key)

    def message_bytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of the message of an array of ``shape`` (float32 values and scales, int32 indices)."""
        size = math.prod(shape)
        if self.kind == "quantize":
            return math.ceil(size * self.bits / 8) + 4 * math.ceil(size / self.block)
        return (8 if self.kind == "topk" else 4) * self.kept(size)


def stochastic_quantize(x: jax.Array, bits: int, block: int, key: jax.Array) -> jax.Array:
    """Unbiased stochastic quantization of ``x`` to ``bits`` bits with one scale per ``block`` values.

    Args:
      x: any shape, n values (flattened in row-major order into blocks; the last block padded).
      bits: b; the 2^b levels of a block are -s + 2 s j / (2^b - 1), s the block's max |x|.
      block: values per scale.
      key: PRNG key of the rounding.

    Returns:
      x_hat, shape and dtype of x, with E[x_hat] = x.
    """
    flat = x.reshape(-1).astype(jnp.float32)
    pad = -flat.size % block
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, block)
    scale = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    levels = 2.0 ** bits - 1
    position = jnp.where(scale > 0, (blocks / jnp.where(scale > 0, scale, 1.0) + 1.0) * 0.5 * levels, 0.0)
    lower = jnp.floor(position)
    up = jax.random.uniform(key, position.shape) < position - lower
    level = jnp.minimum(lower + up, levels)
    decoded = jnp.where(scale > 0, (level / levels * 2.0 - 1.0) * scale, 0.0)
    return decoded.reshape(-1)[: flat.size].reshape(x.shape).astype(x.dtype)


def top_k(x: jax.Array, k: int) -> jax.Array:
    """``x`` with all but its ``k`` entries of largest magnitude set to zero (same shape and dtype)."""
    flat = x.reshape(-1)
    _, index = jax.lax.top_k(jnp.abs(flat), k)
    return jnp.zeros_like(flat).at[index].set(flat[index]).reshape(x.shape)


def random_k(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """``k`` entries of ``x`` drawn uniformly without replacement (from ``key``, which sender and
    receiver share), scaled by n / k so that E[x_hat] = x; the rest zero (same shape and dtype)."""
    flat = x.reshape(-1)
    index = jax.random.choice(key, flat.size, (k,), replace=False)
    kept = (flat[index].astype(jnp.float32) * (flat.size / k)).astype(x.dtype)
    return jnp.zeros_like(flat).at[index].set(kept).reshape(x.shape)
