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

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.models.llama.attention import (KVCache, StreamWindows, apply_rotary, causal_mask,
                                                grouped_attention, positions_from_mask, rope_inverse_frequencies,
                                                rotary_cos_sin, stream_block, stream_windows)
from fedlora_jax.models.llama.config import ACTIVATIONS, LlamaConfig
from fedlora_jax.models.remat import run_layer


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

    def __call__(self, hidden: jax.Array, cos: jax.Array, sin: jax.Array, mask) -> jax.Array:
        """[B, L, H] hidden, [B, L, D] cos/sin, [B, 1, L, L] mask (or a packed stream's
        :class:`StreamWindows`) -> [B, L, H]."""
        query, key, value = self._project(hidden, cos, sin)
        if isinstance(mask, StreamWindows):
            return self._output(mask.attend(query, key, value))
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
    """Token embeddings + decoder layers + final RMSNorm. ``remat``: the layers' rematerialisation
    policy (:mod:`fedlora_jax.models.remat`; None: keep every activation)."""

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
        self.remat: str | None = None

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array | None = None, packing=None
    ) -> jax.Array:
        """[B, L] ids, [B, L] padding mask, optional [B, L] positions -> [B, L, H] hidden states.

        With ``packing`` (a :class:`fedlora_jax.data.packing.Packing`), ``input_ids`` is a packed
        stream [1, T]: each token attends causally within its own example only, at positions that
        restart per example, exactly as in its own padded row; a stream longer than a few rows
        attends block by block (:class:`StreamWindows`), not to all T keys.
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
        elif (block := stream_block(packing.row_length, length)) is not None:
            masks = {
                window: stream_windows(packing.segment_ids, position_ids, packing.row_length, block, window)
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
            hidden = run_layer(layer, self.remat, hidden, cos, sin, masks[layer.sliding_window])
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
        self.remat: str | None = None  # with a policy, training scores its logits blockwise (tasks.model_losses)

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

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      position_ids: jax.Array | None = None, packing=None) -> jax.Array:
        """The final (normed) hidden states [B, L, H] that :meth:`__call__` turns into logits."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return self.model(input_ids, attention_mask, position_ids, packing)

    def output_weight(self) -> jax.Array | None:
        """The output matrix [H, V] of the logits (the tied embeddings' transpose, or the frozen
        ``lm_head`` kernel); None when ``lm_head`` carries an adapter."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        if not isinstance(self.lm_head, nnx.Linear):
            return None
        return self.lm_head.kernel[...]

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
