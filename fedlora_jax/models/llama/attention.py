"""Attention pieces of the Llama family: rotary embeddings (with Llama 3 frequency scaling), causal
and sliding-window masks, real positions of padded rows, the static-shape :class:`KVCache`, and
grouped-query attention."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.models.llama.config import LlamaConfig


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies [head_dim // 2] (float32), with Llama 3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_cos_sin(position_ids: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, L, D] (float32) for positions [B, L] and inv_freq [D // 2]."""
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) on the two halves (HF convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, L, N, D] by cos/sin [B, L, D]."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def causal_mask(
    query_positions: jax.Array,
    key_positions: jax.Array,
    key_padding: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean attention mask [B, 1, Lq, Lk]: causal, padded keys masked, optional window.

    Args:
      query_positions: [Lq] (shared by all rows) or [B, Lq] position of each query.
      key_positions: [Lk] or [B, Lk] position of each key.
      key_padding: [B, Lk], 1 (or True) for real tokens.
      sliding_window: if set, a query at p sees only keys k with p - window < k.
    """
    q = query_positions[..., :, None]
    k = key_positions[..., None, :]
    allowed = k <= q  # [Lq, Lk] or [B, Lq, Lk]
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    return jnp.expand_dims(allowed, -3) & key_padding.astype(bool)[:, None, None, :]


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Real rotary positions [B, L]: the number of real tokens before each token, plus ``start``.

    Args:
      attention_mask: [B, L], 1 for real tokens, 0 for padding.
      start: [B] (or scalar) position of each row's first real token (the number of real tokens
        already in the cache).

    Returns:
      [B, L] int32; real tokens get start, start + 1, ...; a padding token repeats the position
      of the last real token before it (``start`` before the first one). Padding is never
      attended to, so its positions do not matter.
    """
    count_before = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return (jnp.asarray(start, jnp.int32)[..., None] + jnp.maximum(count_before, 0)).astype(jnp.int32)


class KVCache(NamedTuple):
    """Static-shape key/value cache of a decoder (a pytree; T = max_len slots per row).

    Slots are written left to right, the same slots for every row; a slot holding padding is
    marked invalid and never attended to.

    Attributes:
      keys: one [B, T, K, D] array per layer (rotated keys).
      values: one [B, T, K, D] array per layer.
      positions: [B, T] int32 rotary position of the token in each slot.
      valid: [B, T] bool, True where a slot holds a real token.
      length: [] int32, the number of slots written (the next write index).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    positions: jax.Array
    valid: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        """T, the number of slots per row."""
        return self.positions.shape[1]

    @property
    def next_positions(self) -> jax.Array:
        """[B] int32 position of each row's next real token (its count of real tokens so far)."""
        return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)


def grouped_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention; query head n uses key/value head n // (N / K), as HF's repeat_kv.

    Args:
      query: [B, Lq, N, D].
      key, value: [B, Lk, K, D] with N a multiple of K.
      mask: boolean [B, 1, Lq, Lk]. Fully masked rows (left padding) give a uniform average,
        never NaN.

    Returns:
      [B, Lq, N, D]; softmax is computed in float32.
    """
    return jax.nn.dot_product_attention(query, key, value, mask=mask)
