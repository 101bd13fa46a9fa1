"""Weight-only quantization of a model's frozen base: int8 per output channel, or NF4 as in QLoRA.

The frozen base is stored quantized and each weight is dequantized (to the model's dtype) where a
layer reads it, just before its matmul; an embedding lookup gathers the quantized rows and
dequantizes only those. LoRA factors, the task head, biases and norms stay as they are. What this
saves is the stored frozen state: inside a compiled step XLA (on CPU at least) computes every
dequantized weight before the first matmul, so the step's temporaries still hold a float copy.
Schemes (bounds up to float32 rounding):

* ``int8``: symmetric, one float32 scale per output channel, ``absmax / 127`` (a Flax kernel
  [d_in, d_out] per column; an embedding table [vocab, hidden] per row). Per element
  ``|w - dequantize(w)| <= scale / 2``.
* ``nf4`` (Dettmers et al. 2023, QLoRA): the flattened tensor (padded to a multiple of 64) in blocks
  of 64 values, each divided by its absmax and rounded to the nearest of the 16 NormalFloat levels
  (:data:`NF4_LEVELS`, bitsandbytes' table), two 4-bit codes per uint8 (the first in the high
  nibble). Double quantization: the block absmaxes minus their float32 mean are quantized to int8
  in groups of 256, one float32 scale (group absmax / 127) each. Per element
  ``|w - dequantize(w)| <= absmax * NF4_MAX_GAP / 2 + |absmax - dequantized absmax|``, the second
  term at most the group's scale / 2. (bitsandbytes quantizes the absmaxes with its dynamic 8-bit
  map; a linear int8 map is used here.)

:func:`quantize_base` puts a model's frozen linear kernels and embedding tables in this form in
place (:class:`QuantizedWeight`, :class:`QuantizedEmbed`); their arrays are
:class:`QuantizedArray` variables, which :data:`fedlora_jax.models.lora.TRAINABLE` leaves frozen.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from flax import nnx
from flax.nnx.nn import dtypes

from fedlora_jax.models.lora import TRAINABLE, LoRALinear

SCHEMES = ("int8", "nf4")

# QLoRA's NormalFloat4 levels, as bitsandbytes publishes them (bitsandbytes/functional.py)
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_MAX_GAP = float(np.max(np.diff(NF4_LEVELS)))  # 0.304: the largest gap between adjacent levels
NF4_BLOCK = 64  # values per absmax
ABSMAX_GROUP = 256  # absmaxes per float32 scale (double quantization)
DEQUANTIZED = "dequantized"  # the checkpoint name of every dequantized weight (for remat policies)
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


class Int8(NamedTuple):
    """An int8 weight: ``w ~ codes * scale``."""

    codes: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, the weight's shape with size 1 on every axis but the channel axis


class NF4(NamedTuple):
    """An NF4 weight with double-quantized block absmaxes (n values, b = ceil(n / 64) blocks)."""

    packed: jax.Array  # uint8 [32 b]: two 4-bit codes (indices into NF4_LEVELS) per byte
    absmax_codes: jax.Array  # int8 [b]: (absmax - absmax_mean) / absmax_scale, rounded
    absmax_scale: jax.Array  # float32 [ceil(b / 256)]
    absmax_mean: jax.Array  # float32 []


def quantize_int8(w: jax.Array, channel_axis: int = -1) -> Int8:
    """Symmetric int8 with one scale per index of ``channel_axis`` (-1: a Flax kernel's outputs;
    0: an embedding's rows). An all-zero channel gets scale 0 and codes 0."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    codes = jnp.round(w / jnp.where(scale > 0, scale, 1.0))
    return Int8(jnp.clip(codes, -127, 127).astype(jnp.int8), scale)


def dequantize_int8(q: Int8, dtype=jnp.float32) -> jax.Array:
    """``codes * scale`` in ``dtype`` (computed in float32)."""
    return (q.codes.astype(jnp.float32) * q.scale).astype(dtype)


def quantize_nf4(w: jax.Array) -> NF4:
    """NF4 of ``w`` (any shape) in blocks of 64 of its flattened values, absmaxes double-quantized."""
    flat = jnp.asarray(w, jnp.float32).reshape(-1)
    blocks = max(1, -(-flat.size // NF4_BLOCK))
    values = jnp.pad(flat, (0, blocks * NF4_BLOCK - flat.size)).reshape(blocks, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(values), axis=1)
    normed = values / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    # the nearest level (scan_unrolled: O(n) memory, and compiles in a fraction of "scan"'s time)
    codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed, method="scan_unrolled").astype(jnp.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    mean = jnp.mean(absmax)
    groups = -(-blocks // ABSMAX_GROUP)
    centred = jnp.pad(absmax - mean, (0, groups * ABSMAX_GROUP - blocks)).reshape(groups, ABSMAX_GROUP)
    scale = jnp.max(jnp.abs(centred), axis=1) / 127.0
    absmax_codes = jnp.clip(jnp.round(centred / jnp.where(scale > 0, scale, 1.0)[:, None]), -127, 127)
    return NF4(packed.reshape(-1), absmax_codes.reshape(-1)[:blocks].astype(jnp.int8), scale, mean)


def _nf4_absmax(q: NF4, blocks: jax.Array) -> jax.Array:
    """The dequantized absmax of each block index in ``blocks`` (any shape)."""
    return q.absmax_codes[blocks].astype(jnp.float32) * q.absmax_scale[blocks // ABSMAX_GROUP] + q.absmax_mean


def _nf4_unpack(packed: jax.Array) -> jax.Array:
    """[..., m] uint8 -> [..., 2 m] 4-bit codes (high nibble first)."""
    return jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def dequantize_nf4(q: NF4, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The weight of ``shape`` that ``q`` stores, in ``dtype`` (computed in float32)."""
    blocks = q.absmax_codes.shape[0]
    codes = _nf4_unpack(q.packed).reshape(blocks, NF4_BLOCK)
    values = jnp.asarray(NF4_LEVELS)[codes] * _nf4_absmax(q, jnp.arange(blocks))[:, None]
    return values.reshape(-1)[: math.prod(shape)].reshape(shape).astype(dtype)


def nf4_rows(q: NF4, shape: tuple[int, int], indices: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``take(dequantize_nf4(q, shape), indices, axis=0)`` of a 2-d weight, gathering the stored rows
    first and dequantizing only those: [...] int indices -> [..., shape[1]] (the same values, bit
    for bit). Rows of a multiple of 64 values are gathered whole; other widths element by element.
    Flat element indices are int32: at most 2**31 values."""
    width = shape[1]
    indices = indices.astype(jnp.int32)
    if width % NF4_BLOCK == 0:
        per_row = width // NF4_BLOCK
        codes = _nf4_unpack(q.packed.reshape(shape[0], width // 2)[indices])  # [..., width]
        blocks = indices[..., None] * per_row + jnp.arange(per_row, dtype=jnp.int32)  # [..., per_row]
        absmax = jnp.repeat(_nf4_absmax(q, blocks), NF4_BLOCK, axis=-1)
        return (jnp.asarray(NF4_LEVELS)[codes] * absmax).astype(dtype)
    flat = indices[..., None] * width + jnp.arange(width, dtype=jnp.int32)  # [..., width]
    byte = q.packed[flat // 2]
    codes = jnp.where(flat % 2 == 0, byte >> 4, byte & 15)
    return (jnp.asarray(NF4_LEVELS)[codes] * _nf4_absmax(q, flat // NF4_BLOCK)).astype(dtype)


class QuantizedArray(nnx.Variable):
    """The stored arrays of a quantized frozen weight (codes and scales): frozen, never trained."""


class QuantizedWeight(nnx.Module):
    """One frozen weight stored quantized; ``weight[...]`` is the dequantized array (so a layer that
    reads ``self.kernel[...]``, as ``nnx.Linear`` and :class:`LoRALinear` do, works unchanged).

    Args:
      w: the float weight (a kernel [d_in, d_out], an embedding table [vocab, hidden]).
      scheme: "int8" or "nf4".
      channel_axis: int8's axis with one scale per index (-1: output channels; 0: rows).

    Attributes:
      scheme, shape: as given.
      dtype: the dtype dequantization returns: ``w``'s (the model's float32 or bfloat16).
    """

    def __init__(self, w: jax.Array, scheme: str, channel_axis: int = -1):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {SCHEMES}")
        self.scheme, self.shape, self.dtype = scheme, tuple(w.shape), jnp.dtype(w.dtype)
        q = _quantize_int8(w, channel_axis) if scheme == "int8" else _quantize_nf4(w)
        for field, value in zip(q._fields, q):
            setattr(self, field, QuantizedArray(value))

    def stored(self) -> Int8 | NF4:
        """The stored arrays."""
        kind = Int8 if self.scheme == "int8" else NF4
        return kind(*(getattr(self, field)[...] for field in kind._fields))

    def dequantize(self, dtype=None) -> jax.Array:
        """The whole weight in ``dtype`` (default: :attr:`dtype`)."""
        dtype = dtype or self.dtype
        if self.scheme == "int8":
            w = dequantize_int8(self.stored(), dtype)
        else:
            w = dequantize_nf4(self.stored(), self.shape, dtype)
        return checkpoint_name(w, DEQUANTIZED)

    def __getitem__(self, index) -> jax.Array:
        return self.dequantize()[index]

    def rows(self, indices: jax.Array) -> jax.Array:
        """``take(dequantize(), indices, axis=0)`` of a 2-d weight, dequantizing only those rows:
        [...] int indices -> [..., shape[1]]."""
        if self.scheme == "int8":
            q = self.stored()
            return dequantize_int8(Int8(q.codes[indices], q.scale[indices]), self.dtype)
        return nf4_rows(self.stored(), self.shape, indices, self.dtype)

    def float_bytes(self) -> int:
        """Bytes of the float weight this replaces."""
        return math.prod(self.shape) * self.dtype.itemsize


_quantize_int8 = jax.jit(quantize_int8, static_argnums=1)
_quantize_nf4 = jax.jit(quantize_nf4)


class QuantizedEmbed(nnx.Module):
    """``nnx.Embed`` with its table stored quantized (int8 per row, or NF4): a lookup gathers the
    quantized rows and dequantizes only those; :meth:`attend` (a tied LM head) dequantizes the table."""

    def __init__(self, embed: nnx.Embed, scheme: str):
        self.num_embeddings, self.features = embed.num_embeddings, embed.features
        self.dtype, self.param_dtype = embed.dtype, embed.param_dtype
        self.embedding = QuantizedWeight(embed.embedding[...], scheme, channel_axis=0)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """[...] int ids -> [..., features] in :attr:`dtype`."""
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        return self.embedding.rows(inputs).astype(self.dtype)

    def attend(self, query: jax.Array) -> jax.Array:
        """[..., features] -> [..., num_embeddings]: ``query @ table.T``, as ``nnx.Embed.attend``."""
        query, table = dtypes.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        return jnp.dot(query, table.T)


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def quantize_base(model: nnx.Module, scheme: str) -> list[str]:
    """Stores the frozen base of ``model`` quantized, in place: the kernel of every frozen linear
    layer (``nnx.Linear`` and :class:`LoRALinear`'s ``kernel``) becomes a :class:`QuantizedWeight`
    and every ``nnx.Embed`` a :class:`QuantizedEmbed`. The task head (any module under a ``head``),
    the LoRA factors, biases and norms stay as they are.

    Returns:
      The dotted paths of the quantized weights (``bert.layers.0.attention.query.kernel``).

    Raises:
      ValueError: an unknown ``scheme``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {SCHEMES}")
    done = []
    for path, module in list(nnx.iter_graph(model)):
        if not path or "head" in path:
            continue
        if isinstance(module, (nnx.Linear, LoRALinear)) and not isinstance(module.kernel, QuantizedWeight):
            module.kernel = QuantizedWeight(module.kernel[...], scheme)
            done.append(_path_name(path + ("kernel",)))
        elif isinstance(module, nnx.Embed):
            parent = model
            for key in path[:-1]:
                parent = _child(parent, key)
            quantized = QuantizedEmbed(module, scheme)
            if isinstance(path[-1], int):
                parent[path[-1]] = quantized
            else:
                setattr(parent, path[-1], quantized)
            done.append(_path_name(path + ("embedding",)))
    return done


def dequantize_base(model: nnx.Module) -> None:
    """The inverse in form of :func:`quantize_base`, in place: every quantized weight becomes a float
    ``nnx.Param`` of its dequantized values (the weights a quantized model computes with)."""
    for path, module in list(nnx.iter_graph(model)):
        if isinstance(module, (nnx.Linear, LoRALinear)) and isinstance(module.kernel, QuantizedWeight):
            module.kernel = nnx.Param(module.kernel.dequantize())
        elif isinstance(module, QuantizedEmbed):
            embed = nnx.Embed(module.num_embeddings, module.features, dtype=module.dtype,
                              param_dtype=module.param_dtype, rngs=nnx.Rngs(0))
            embed.embedding = nnx.Param(module.embedding.dequantize())
            parent = model
            for key in path[:-1]:
                parent = _child(parent, key)
            if isinstance(path[-1], int):
                parent[path[-1]] = embed
            else:
                setattr(parent, path[-1], embed)


class FrozenBytes(NamedTuple):
    """Bytes of a model's frozen state as stored, and as it would be with every weight float."""

    stored: int
    float: int


def frozen_bytes(model: nnx.Module) -> FrozenBytes:
    """Stored bytes of ``model``'s frozen (non-trainable) state, and its bytes with each quantized
    weight counted at its float size (``float / stored``: the saving)."""
    _, _, frozen = nnx.split(model, TRAINABLE, ...)
    stored = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(frozen))
    weights = [m for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedWeight)]
    quantized = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                    for w in weights for x in w.stored())
    return FrozenBytes(stored, stored - quantized + sum(w.float_bytes() for w in weights))
