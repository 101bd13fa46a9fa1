"""BERT and RoBERTa encoders in Flax NNX, numerically matching Hugging Face PyTorch (eager).

The models are deterministic: there is no dropout anywhere (the federated/DP training this
library runs treats the forward pass as a pure function of the parameters). Every linear layer
is a plain ``nnx.Linear`` so that :func:`fedlora_jax.models.lora.inject_lora` can replace it; the
attention projections are named ``query``, ``key``, ``value`` as in Hugging Face.

Module tree (dotted paths, which LoRA target regexes match)::

    embeddings.{word_embeddings, position_embeddings, token_type_embeddings, layer_norm}
    layers.<i>.attention.{query, key, value}
    layers.<i>.{attention_output, attention_norm, intermediate, output, output_norm}
    pooler                                   (BERT sequence classification only; frozen)

:class:`BertForSequenceClassification` wraps that tree under ``bert`` and adds the trainable
task ``head``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.data.packing import Packing
from fedlora_jax.models.bert import attention as kernels
from fedlora_jax.models.bert.config import ACTIVATIONS, BertConfig
from fedlora_jax.models.lora import Linear
from fedlora_jax.models.remat import run_layer

HEAD_KINDS = ("bert", "roberta")  # the task head of BertForSequenceClassification


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """RoBERTa position ids: pad_token_id+1, +2, ... over real tokens; pad_token_id on padding.

    Args:
      input_ids: [B, L] token ids.
      pad_token_id: the padding token id (also the padding position index).

    Returns:
      [B, L] int32 position ids.
    """
    is_token = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(is_token, axis=1) * is_token + pad_token_id


def _linear(d_in: int, d_out: int, config: BertConfig, dtype, param_dtype, rngs: nnx.Rngs,
            kind=nnx.Linear) -> nnx.Linear:
    return kind(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        rngs=rngs,
    )


def _layer_norm(config: BertConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class BertEmbeddings(nnx.Module):
    """Word + position + token-type embeddings followed by LayerNorm."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        embed = functools.partial(nnx.Embed, dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs)
        self.word_embeddings = embed(config.vocab_size, config.hidden_size)
        self.position_embeddings = embed(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = embed(config.type_vocab_size, config.hidden_size)
        self.layer_norm = _layer_norm(config, dtype, param_dtype, rngs)
        self.roberta_positions = config.roberta_positions
        self.pad_token_id = config.pad_token_id

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        """[B, L] ids and token types (and optional [B, L] positions inside each example, for
        packed streams) -> [B, L, H] embeddings."""
        longest = input_ids.shape[1] + (self.pad_token_id + 1 if self.roberta_positions else 0)
        if positions is None and longest > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} needs {longest} position embeddings; "
                f"the model has {self.position_embeddings.num_embeddings}"
            )
        if positions is not None:
            positions = positions + (self.pad_token_id + 1 if self.roberta_positions else 0)
        elif self.roberta_positions:
            positions = roberta_position_ids(input_ids, self.pad_token_id)
        else:
            positions = jnp.arange(input_ids.shape[1])[None, :]
        hidden = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return self.layer_norm(hidden)


class BertSelfAttention(nnx.Module):
    """The ``query``/``key``/``value`` projections and scaled dot-product attention."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.query = _linear(hidden, hidden, config, dtype, param_dtype, rngs)
        self.key = _linear(hidden, hidden, config, dtype, param_dtype, rngs)
        self.value = _linear(hidden, hidden, config, dtype, param_dtype, rngs)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim

    def __call__(self, hidden: jax.Array, mask) -> jax.Array:
        """[B, L, H] hidden states, boolean mask (:func:`.attention.attention_mask_for`) or, for an
        aligned packed stream, its :class:`Packing` (:func:`.attention.stream_attention`) -> [B, L, H]
        attention output (before projection)."""
        batch, length, _ = hidden.shape
        head_shape = (batch, length, self.num_heads, self.head_dim)
        attend = kernels.stream_attention if isinstance(mask, Packing) else kernels.padding_attention
        out = attend(
            self.query(hidden).reshape(head_shape),
            self.key(hidden).reshape(head_shape),
            self.value(hidden).reshape(head_shape),
            mask,
        )
        return out.reshape(batch, length, self.num_heads * self.head_dim)

    def first_token_context(self, hidden: jax.Array, first: jax.Array, mask, packing: Packing | None) -> jax.Array:
        """Attention output at each example's first token only (queries there, keys everywhere).

        Args:
          hidden: [B, L, H] padded rows or [1, T, H] a packed stream.
          first: [B, H] or [b, H], the first-token states (:func:`first_token_states`).
          mask: padded rows: the boolean mask of :func:`.attention.attention_mask_for`
            ([B, 1, 1, L]); a packed stream's keys are gathered per example instead, and it is
            not read.
          packing: the stream's :class:`Packing` (None for padded rows).

        Returns:
          [B, H] or [b, H].
        """
        heads = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))  # noqa: E731
        query = heads(self.query(first))[:, None]  # [B or b, 1, N, D]
        key, value = heads(self.key(hidden)), heads(self.value(hidden))
        if packing is not None:  # each example's L key slots gathered from the stream, real ones unmasked
            index, real = packing.example_tokens()  # [b, L]
            key, value, mask = key[0, index], value[0, index], real[:, None, None, :]
        out = kernels.padding_attention(query, key, value, mask)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)


def first_token_states(hidden: jax.Array, packing: Packing | None) -> jax.Array:
    """Each example's first-token state: [B, L, H] padded rows -> [B, H]; a [1, T, H] packed stream
    -> [b, H] (at ``packing.starts``)."""
    return hidden[:, 0] if packing is None else hidden[0, packing.starts]


class BertLayer(nnx.Module):
    """Post-LayerNorm transformer block: attention + residual + LN, MLP + residual + LN."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.attention = BertSelfAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_output = _linear(hidden, hidden, config, dtype, param_dtype, rngs)
        self.attention_norm = _layer_norm(config, dtype, param_dtype, rngs)
        self.intermediate = _linear(hidden, inner, config, dtype, param_dtype, rngs)
        self.output = _linear(inner, hidden, config, dtype, param_dtype, rngs)
        self.output_norm = _layer_norm(config, dtype, param_dtype, rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L, H], boolean attention mask -> [B, L, H]."""
        hidden = self.attention_norm(hidden + self.attention_output(self.attention(hidden, mask)))
        inner = ACTIVATIONS[self.hidden_act](self.intermediate(hidden))
        return self.output_norm(hidden + self.output(inner))

    def first_tokens(self, hidden: jax.Array, mask: jax.Array, packing: Packing | None) -> jax.Array:
        """The layer's output at each example's first token only: [B, L, H] padded rows or a
        [1, T, H] packed stream -> [B, H] or [b, H]. Keys and values still come from every token;
        the query, the attention output and the MLP run on the first tokens alone (all that a
        first-token head reads of the last layer)."""
        first = first_token_states(hidden, packing)
        context = self.attention.first_token_context(hidden, first, mask, packing)
        first = self.attention_norm(first + self.attention_output(context))
        inner = ACTIVATIONS[self.hidden_act](self.intermediate(first))
        return self.output_norm(first + self.output(inner))


class BertModel(nnx.Module):
    """BERT/RoBERTa encoder: embeddings + a stack of :class:`BertLayer` (+ optional pooler).

    Args:
      config: the encoder hyperparameters.
      add_pooler: add BERT's pooler (dense + tanh on the first token), used by the BERT
        classification head. It is part of the (frozen) encoder.
      dtype: compute dtype (None: that of the parameters).
      param_dtype: parameter dtype.
      rngs: initialisation randomness.
    """

    default_lora_targets = ("query", "value")
    aligned_packing = True  # packed streams attend block by block (stream_attention)

    def __init__(
        self,
        config: BertConfig,
        *,
        add_pooler: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.embeddings = BertEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                BertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        hidden = config.hidden_size
        self.pooler = _linear(hidden, hidden, config, dtype, param_dtype, rngs) if add_pooler else None
        self.remat: str | None = None  # the layers' rematerialisation policy (fedlora_jax.models.remat)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        packing=None,
        first_tokens_only: bool = False,
    ) -> jax.Array:
        """Encodes a batch of padded rows or a packed stream.

        Args:
          input_ids: [B, L] int token ids.
          attention_mask: [B, L], 1 for real tokens, 0 for padding (None: all real; ignored when
            packed).
          token_type_ids: [B, L] segment ids (None: all 0).
          packing: a :class:`fedlora_jax.data.packing.Packing` when ``input_ids`` is a packed
            stream [1, T]: attention stays inside each example and positions restart per example.
          first_tokens_only: return only each example's first-token state, with the last layer
            run for those tokens alone (:meth:`BertLayer.first_tokens`).

        Returns:
          [B, L, H] last hidden states ([1, T, H] packed); with ``first_tokens_only`` [B, H]
          ([b, H] packed: one row per example).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        positions = None if packing is None else packing.positions
        hidden = self.embeddings(input_ids, token_type_ids, positions)
        if packing is not None and packing.aligned and input_ids.shape[1] > packing.row_length:
            mask = packing  # attention block by block (stream_attention)
        else:
            mask = kernels.attention_mask_for(attention_mask, packing)
        if not first_tokens_only:
            for layer in self.layers:
                hidden = run_layer(layer, self.remat, hidden, mask)
            return hidden
        if not self.layers:
            return first_token_states(hidden, packing)
        for layer in self.layers[:-1]:
            hidden = run_layer(layer, self.remat, hidden, mask)
        return self.layers[-1].first_tokens(hidden, mask, packing)

    def pool(self, first: jax.Array) -> jax.Array:
        """BERT pooler: [B, H] first-token states -> [B, H] = tanh(dense(first))."""
        if self.pooler is None:
            raise ValueError("this BertModel was built without a pooler (add_pooler=False)")
        return jnp.tanh(self.pooler(first))


class RobertaClassificationHead(nnx.Module):
    """RoBERTa sequence head: out_proj(tanh(dense(hidden[:, 0])))."""

    def __init__(self, config: BertConfig, num_labels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.dense = _linear(hidden, hidden, config, dtype, param_dtype, rngs, Linear)
        self.out_proj = _linear(hidden, num_labels, config, dtype, param_dtype, rngs, Linear)

    def __call__(self, first: jax.Array) -> jax.Array:
        """[B, H] first-token (or pooled) states -> [B, num_labels]."""
        return self.out_proj(jnp.tanh(self.dense(first)))


class BertForSequenceClassification(nnx.Module):
    """Encoder + sequence-level task head; ``num_labels == 1`` is a regression head.

    The trainable head is the submodule ``head`` (the trainable filter matches that name):
    for ``head="bert"`` it is the classifier ``nnx.Linear`` applied to the frozen pooler
    output; for ``head="roberta"`` it is :class:`RobertaClassificationHead` (dense + tanh +
    out_proj on the first token, no pooler). With ``pooling="mean"`` the head reads the masked
    mean of the last hidden states instead of the first token (BERT: no pooler), which suits
    checkpoints trained for mean pooling such as sentence-transformers' all-MiniLM-L6-v2.

    Args:
      config: the encoder hyperparameters.
      num_labels: number of outputs (1: regression).
      head: "bert" or "roberta".
      pooling: "cls" (first token, as HF) or "mean".
      dtype: compute dtype (None: that of the parameters).
      param_dtype: parameter dtype.
      rngs: initialisation randomness.
    """

    default_lora_targets = ("query", "value")
    aligned_packing = True

    def __init__(
        self,
        config: BertConfig,
        num_labels: int,
        head: str = "bert",
        pooling: str = "cls",
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if head not in HEAD_KINDS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEAD_KINDS}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'mean'")
        self.pooling = pooling
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.head_kind = head
        self.bert = BertModel(config, add_pooler=head == "bert" and pooling == "cls", dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        if head == "bert":
            self.head = _linear(config.hidden_size, num_labels, config, dtype, param_dtype, rngs, Linear)
        else:
            self.head = RobertaClassificationHead(config, num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        packing=None,
    ) -> jax.Array:
        """[B, L] ids, [B, L] mask, optional [B, L] token types -> [B, num_labels] logits.

        With ``packing`` (a packed stream [1, T] of b examples, see
        :class:`fedlora_jax.data.packing.Packing`) the logits are [b, num_labels], one row per example.
        """
        if self.pooling == "mean":
            hidden = self.bert(input_ids, attention_mask, token_type_ids, packing)
            if packing is not None:
                weights = packing.segment_matrix(hidden.dtype)  # [b, T]
                pooled = (weights @ hidden[0]) / jnp.maximum(packing.lengths, 1)[:, None].astype(hidden.dtype)
            else:
                mask = (jnp.ones(hidden.shape[:2], hidden.dtype) if attention_mask is None
                        else attention_mask.astype(hidden.dtype))
                counts = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
                pooled = jnp.sum(hidden * mask[..., None], axis=1) / counts
            return self.head(pooled)
        first = self.bert(input_ids, attention_mask, token_type_ids, packing, first_tokens_only=True)
        if self.head_kind == "bert":
            return self.head(self.bert.pool(first))
        return self.head(first)
