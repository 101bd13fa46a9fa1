"""A Llama-style decoder in Flax NNX, numerically matching Hugging Face ``LlamaForCausalLM``.

RMSNorm, rotary position embeddings (HF ``rotate_half`` convention, ``default`` and ``llama3``
frequency scaling), SwiGLU MLP, grouped-query attention, optional sliding-window layers
(Mistral/Qwen2 configs), optional tied input/output embeddings. No dropout: the forward pass
is deterministic. Module names follow Hugging Face (``model.layers.<i>.self_attn.q_proj``,
``mlp.gate_proj``, ``lm_head``...), so checkpoint names map one to one.

Positions: as in HF's forward without ``position_ids``, positions are 0..L-1 whatever the
padding; padded keys are masked out. Pass ``position_ids`` to override.

Generation (:meth:`LlamaForCausalLM.prefill`, :meth:`LlamaForCausalLM.decode_step`) uses a
static-shape :class:`KVCache` and *real* positions: a row's rotary position counts its real
tokens only (:func:`positions_from_mask`), so a left-padded prompt is encoded exactly as the same
prompt without padding. Causality and sliding windows are taken on these positions, and padded
cache slots are masked out, so prompts may be padded on either side. To reproduce a cached
decode with :meth:`LlamaForCausalLM.__call__`, pass ``position_ids=positions_from_mask(mask)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False)}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 rotary frequency scaling (HF ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-style decoder, named as in Hugging Face ``config.json``.

    Attributes:
      attention_bias: bias on q_proj/k_proj/v_proj.
      attention_out_bias: bias on o_proj (Llama: same as attention_bias; Qwen2: False).
      sliding_window: window of the sliding-window layers (a query at position p attends keys
        at p - window < k <= p); None for none.
      sliding_layers: per layer, whether it uses the sliding window (empty: none does).
      rope_scaling: Llama 3 frequency scaling, or None for plain RoPE.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_hidden_layers:
            raise ValueError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_hidden_layers} layers"
            )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: full causal attention)."""
        if self.sliding_window is None or not self.sliding_layers:
            return None
        return self.sliding_window if self.sliding_layers[layer] else None

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """Builds the config from a Hugging Face ``config.json`` dict (llama, mistral, qwen2)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} for the Llama decoder")
        heads = hf["num_attention_heads"]
        layers = hf["num_hidden_layers"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = Llama3RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
                ),
            )
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; implemented: 'default', 'llama3'")
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
            window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
            layer_types = hf.get("layer_types")
            if window is not None and layer_types is None:
                first_sliding = hf.get("max_window_layers", layers)
                layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(layers)]
        else:
            qkv_bias = out_bias = bool(hf.get("attention_bias", False))
            window = hf.get("sliding_window") if model_type == "mistral" else None
            layer_types = hf.get("layer_types") or (["sliding_attention"] * layers if window is not None else None)
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types) if window is not None else ()
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            hidden_act=hf.get("hidden_act", "silu"),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            initializer_range=hf.get("initializer_range", 0.02),
        )


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


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in float32 as HF does."""

    def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., H] -> [..., H] in x's dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * normed.astype(x.dtype)).astype(x.dtype)


def _linear(d_in: int, d_out: int, bias: bool, config: LlamaConfig, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        rngs=rngs,
    )


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden, hd = config.hidden_size, config.head_dim
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        qkv_bias = config.attention_bias
        self.q_proj = _linear(hidden, heads * hd, qkv_bias, config, dtype, param_dtype, rngs)
        self.k_proj = _linear(hidden, kv_heads * hd, qkv_bias, config, dtype, param_dtype, rngs)
        self.v_proj = _linear(hidden, kv_heads * hd, qkv_bias, config, dtype, param_dtype, rngs)
        self.o_proj = _linear(heads * hd, hidden, config.attention_out_bias, config, dtype, param_dtype, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, hd

    def _project(self, hidden: jax.Array, cos: jax.Array, sin: jax.Array):
        """[B, L, H] -> rotated query [B, L, N, D], rotated key and value [B, L, K, D]."""
        batch, length, _ = hidden.shape
        query = self.q_proj(hidden).reshape(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim)
        return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin), value

    def _output(self, attended: jax.Array) -> jax.Array:
        """[B, L, N, D] -> [B, L, H]."""
        batch, length = attended.shape[:2]
        return self.o_proj(attended.reshape(batch, length, self.num_heads * self.head_dim))

    def __call__(self, hidden: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L, H] hidden, [B, L, D] cos/sin, [B, 1, L, L] mask -> [B, L, H]."""
        query, key, value = self._project(hidden, cos, sin)
        return self._output(grouped_attention(query, key, value, mask))

    def cached(
        self,
        hidden: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of L new tokens over a key/value cache, after writing them into it.

        Args:
          hidden: [B, L, H] new tokens.
          cos, sin: [B, L, D] rotary tables of the new tokens.
          mask: [B, 1, L, T] boolean mask over the cache slots (after the write).
          keys, values: [B, T, K, D] this layer's cache.
          index: [] int32 slot of the first new token.

        Returns:
          ([B, L, H] output, updated keys, updated values).
        """
        query, key, value = self._project(hidden, cos, sin)
        start = (jnp.int32(0), index, jnp.int32(0), jnp.int32(0))
        keys = jax.lax.dynamic_update_slice(keys, key.astype(keys.dtype), start)
        values = jax.lax.dynamic_update_slice(values, value.astype(values.dtype), start)
        attended = grouped_attention(query, keys.astype(query.dtype), values.astype(query.dtype), mask)
        return self._output(attended), keys, values


class LlamaMLP(nnx.Module):
    """SwiGLU: down_proj(act(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(hidden, inner, bias, config, dtype, param_dtype, rngs)
        self.up_proj = _linear(hidden, inner, bias, config, dtype, param_dtype, rngs)
        self.down_proj = _linear(inner, hidden, bias, config, dtype, param_dtype, rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., H] -> [..., H]."""
        return self.down_proj(ACTIVATIONS[self.hidden_act](self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.sliding_window = config.layer_window(layer)

    def __call__(self, hidden: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L, H] -> [B, L, H]; ``mask`` is this layer's [B, 1, L, L] boolean mask."""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def cached(
        self,
        hidden: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on [B, L, H] new tokens over this layer's [B, T, K, D] cache (see
        :meth:`LlamaAttention.cached`); returns ([B, L, H], updated keys, updated values)."""
        attended, keys, values = self.self_attn.cached(
            self.input_layernorm(hidden), cos, sin, mask, keys, values, index
        )
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), keys, values


class LlamaModel(nnx.Module):
    """Token embeddings + decoder layers + final RMSNorm."""

    def __init__(self, config: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(config.initializer_range),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                LlamaDecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array | None = None, packing=None
    ) -> jax.Array:
        """[B, L] ids, [B, L] padding mask, optional [B, L] positions -> [B, L, H] hidden states.

        With ``packing`` (a :class:`fedlora_jax.data.packing.Packing`), ``input_ids`` is a packed
        stream [1, T]: each token attends causally within its own example only, at positions that
        restart per example, exactly as in its own padded row.
        """
        length = input_ids.shape[1]
        if packing is not None:
            position_ids = packing.positions
        elif position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        cos, sin = rotary_cos_sin(position_ids, rope_inverse_frequencies(self.config))
        if packing is None:
            sequence = jnp.arange(length)
            masks = {
                window: causal_mask(sequence, sequence, attention_mask, window)
                for window in {layer.sliding_window for layer in self.layers}
            }
        else:
            segments = packing.segment_ids
            same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
            masks = {
                window: causal_mask(position_ids, position_ids, jnp.ones_like(segments), window) & same[:, None]
                for window in {layer.sliding_window for layer in self.layers}
            }
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, masks[layer.sliding_window])
        return self.norm(hidden)

    def cached(
        self, input_ids: jax.Array, attention_mask: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Runs L new tokens against a cache and appends them to it.

        Args:
          input_ids: [B, L] new token ids, written to slots ``cache.length`` .. + L - 1.
          attention_mask: [B, L], 1 for real tokens, 0 for padding.
          cache: the cache so far (``cache.length + L <= cache.max_len``; beyond it the write
            index is clamped and earlier slots are overwritten).

        Returns:
          ([B, L, H] final (normed) hidden states of the new tokens, updated cache).
        """
        index = cache.length
        positions = positions_from_mask(attention_mask, cache.next_positions)
        key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (jnp.int32(0), index))
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(bool), (jnp.int32(0), index))
        cos, sin = rotary_cos_sin(positions, rope_inverse_frequencies(self.config))
        masks = {
            window: causal_mask(positions, key_positions, valid, window)
            for window in {layer.sliding_window for layer in self.layers}
        }
        hidden = self.embed_tokens(input_ids)
        keys, values = [], []
        for layer, layer_keys, layer_values in zip(self.layers, cache.keys, cache.values):
            hidden, layer_keys, layer_values = layer.cached(
                hidden, cos, sin, masks[layer.sliding_window], layer_keys, layer_values, index
            )
            keys.append(layer_keys)
            values.append(layer_values)
        new_cache = KVCache(tuple(keys), tuple(values), key_positions, valid, index + input_ids.shape[1])
        return self.norm(hidden), new_cache


class LlamaForCausalLM(nnx.Module):
    """Decoder + language-model head (frozen ``lm_head``; None when tied to the embeddings).

    Args:
      config: the decoder hyperparameters.
      dtype: compute dtype (None: that of the parameters).
      param_dtype: parameter dtype.
      rngs: initialisation randomness.
    """

    default_lora_targets = ("q_proj", "v_proj")

    def __init__(self, config: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, config, dtype, param_dtype, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        packing=None,
    ) -> jax.Array:
        """Next-token logits (of every stream token [1, T, V] with ``packing``, see :class:`LlamaModel`).

        Args:
          input_ids: [B, L] int token ids.
          attention_mask: [B, L], 1 for real tokens, 0 for padding (left or right); None: all real.
          position_ids: [B, L] rotary positions (None: 0..L-1 for every row, as HF's default).

        Returns:
          [B, L, V] logits. Rows at padded positions are defined (finite) but meaningless.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return self._logits(self.model(input_ids, attention_mask, position_ids, packing))

    def _logits(self, hidden: jax.Array) -> jax.Array:
        """[..., H] final hidden states -> [..., V] logits."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache of ``max_len`` slots per row, in the model's compute dtype.

        Returns:
          KVCache with per-layer keys/values [batch_size, max_len, K, D] of zeros, no valid slot
          and length 0.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        config = self.config
        shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
        dtype = self.model.embed_tokens.dtype
        layers = config.num_hidden_layers
        return KVCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            positions=jnp.zeros((batch_size, max_len), jnp.int32),
            valid=jnp.zeros((batch_size, max_len), bool),
            length=jnp.zeros((), jnp.int32),
        )

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, max_len: int
    ) -> tuple[jax.Array, KVCache]:
        """Encodes prompts into a fresh cache; returns the next-token logits of each prompt.

        Args:
          input_ids: [B, L] prompt ids, padded on either side (left padding is usual).
          attention_mask: [B, L], 1 for real tokens; every row needs at least one.
          max_len: T >= L, cache slots per row (L + the number of tokens to decode after).

        Returns:
          (logits [B, V] at each row's last real token, cache with L slots written). Positions
          are real positions (:func:`positions_from_mask`).
        """
        batch, length = input_ids.shape
        if max_len < length:
            raise ValueError(f"max_len {max_len} is shorter than the prompt length {length}")
        hidden, cache = self.model.cached(input_ids, attention_mask, self.init_cache(batch, max_len))
        last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(length), 0), axis=-1)  # [B]
        return self._logits(hidden[jnp.arange(batch), last]), cache

    def decode_step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Feeds one real token per row and returns the logits of the token after it.

        Args:
          tokens: [B] token ids, written to slot ``cache.length`` at each row's next position.
          cache: the cache from :meth:`prefill` or a previous step (``cache.length <
            cache.max_len``).

        Returns:
          (logits [B, V], cache one slot longer).
        """
        hidden, cache = self.model.cached(tokens[:, None], jnp.ones((tokens.shape[0], 1), jnp.int32), cache)
        return self._logits(hidden[:, 0]), cache
