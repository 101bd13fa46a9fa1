"""Attention pieces of the Llama family: rotary embeddings (with Llama 3 frequency scaling), causal
and sliding-window masks, real positions of padded rows, the static-shape :class:`KVCache`, and
grouped-query attention, over padded rows or (:class:`StreamWindows`) block by block over a packed
stream."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.struct
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


@flax.struct.dataclass
class StreamWindows:
    """The keys each block of a packed decoder stream attends to.

    A packed stream [1, T] holds examples of at most L tokens (the padded row length), so a query's
    keys (earlier tokens of its own example) lie within the L - 1 tokens before it. Queries are
    taken in blocks of Q tokens; block i attends to its own keys and those of the ``blocks_back``
    = ceil((L - 1) / Q) blocks before it: (blocks_back + 1) Q keys per query instead of T.

    mask: [nb, 1, Q, (blocks_back + 1) Q] boolean, per layer window (see :func:`stream_windows`).
    block: Q (static).
    blocks_back: key blocks before a query's own (static).
    """

    mask: jax.Array
    block: int = flax.struct.field(pytree_node=False, default=0)
    blocks_back: int = flax.struct.field(pytree_node=False, default=0)

    def keys(self, x: jax.Array) -> jax.Array:
        """[1, T, K, D] stream keys (or values) -> [nb, (blocks_back + 1) Q, K, D] each block's window."""
        num_blocks = self.mask.shape[0]
        back = self.blocks_back * self.block
        x = jnp.pad(x[0], [(back, num_blocks * self.block - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((num_blocks + self.blocks_back, self.block) + x.shape[1:])
        return jnp.concatenate([x[j: j + num_blocks] for j in range(self.blocks_back + 1)], axis=1)

    def queries(self, x: jax.Array) -> jax.Array:
        """[1, T, N, D] -> [nb, Q, N, D] (the tail padded)."""
        num_blocks = self.mask.shape[0]
        x = jnp.pad(x[0], [(0, num_blocks * self.block - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((num_blocks, self.block) + x.shape[1:])

    def attend(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        """:func:`grouped_attention` of a packed stream, block by block: [1, T, N, D] queries and
        [1, T, K, D] keys/values -> [1, T, N, D]."""
        out = grouped_attention(self.queries(query), self.keys(key), self.keys(value), self.mask)
        return out.reshape((1, -1) + out.shape[2:])[:, : query.shape[1]]


STREAM_BLOCK = 128  # the most queries per block of a packed stream's attention


def stream_block(row_length: int, length: int) -> int | None:
    """Queries per block Q of a packed stream of ``length`` tokens holding examples of at most
    ``row_length``, or None when attending to the whole stream costs no more than twice the
    windows (:class:`StreamWindows`). Q is the power of two at or above half the row length (at
    least 8, at most :data:`STREAM_BLOCK`: 64-128 measured fastest on a CPU for L = 256)."""
    block = min(STREAM_BLOCK, max(8, 1 << max(0, (row_length // 2 - 1).bit_length())))
    keys = (-(-(row_length - 1) // block) + 1) * block
    return block if 2 * keys <= length else None


def stream_windows(segment_ids: jax.Array, positions: jax.Array, row_length: int, block: int,
                   sliding_window: int | None = None) -> StreamWindows:
    """The :class:`StreamWindows` of a packed stream: a query sees the earlier tokens of its own
    example (and within ``sliding_window`` positions of it); tail tokens (segment 0) see none.

    Args:
      segment_ids, positions: [1, T] of the stream (:class:`fedlora_jax.data.packing.Packing`).
      row_length: L, the longest an example can be.
      block: Q, queries per block.
      sliding_window: the layer's window, if any.
    """
    length = segment_ids.shape[1]
    num_blocks = -(-length // block)
    windows = StreamWindows(jnp.zeros((num_blocks, 1, 1, 1), bool), block, -(-(row_length - 1) // block))
    index = jnp.arange(length, dtype=jnp.int32)[None, :, None, None]
    query_index, key_index = windows.queries(index)[..., 0, 0], windows.keys(index + 1)[..., 0, 0] - 1
    query_segment, key_segment = (windows.queries(segment_ids[..., None, None])[..., 0, 0],
                                  windows.keys(segment_ids[..., None, None])[..., 0, 0])  # padding: segment 0
    mask = ((query_segment[:, :, None] == key_segment[:, None, :]) & (query_segment[:, :, None] > 0)
            & (key_index[:, None, :] <= query_index[:, :, None]))
    if sliding_window is not None:
        query_position = windows.queries(positions[..., None, None])[..., 0, 0]
        key_position = windows.keys(positions[..., None, None])[..., 0, 0]
        mask &= key_position[:, None, :] > query_position[:, :, None] - sliding_window
    return windows.replace(mask=mask[:, None])
