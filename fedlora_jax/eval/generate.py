"""Greedy generation with a KV cache, and GSM8K exact-match accuracy of the generated answers.

:func:`greedy_generate` works on the split NNX states the engine holds (graphdef, trainable
state, frozen state) and merges them inside one jitted function: a prefill of the prompts into a
static-shape :class:`~fedlora_jax.models.llama.KVCache`, then a ``lax.scan`` of
``max_new_tokens - 1`` single-token decode steps. Prompts are left-padded by convention (any
padding works: the cache path uses real positions, see :mod:`fedlora_jax.models.llama`).
:func:`gsm8k_exact_match` tokenises, left-pads and batches prompts on the host, generates, decodes
and scores the final numbers with :func:`fedlora_jax.eval.metrics.gsm8k_accuracy`.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from fedlora_jax.data.tokenise import load_tokenizer
from fedlora_jax.eval.metrics import gsm8k_accuracy


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def greedy_generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Greedy (argmax) continuation of a batch of prompts, with a KV cache; jitted.

    Args:
      graphdef: the model's graph definition (static); the merged model must provide
        ``prefill`` and ``decode_step`` (e.g. ``LlamaForCausalLM``).
      params: trainable state (LoRA factors), as from ``split_model``.
      frozen: frozen state.
      input_ids: [B, L] int prompt ids, left-padded by convention.
      attention_mask: [B, L], 1 for real tokens; every row needs at least one.
      max_new_tokens: N >= 1, tokens generated per row (static).
      eos_id: end-of-sequence id (static); a row emits ``pad_id`` after its first EOS. None: no
        stopping.
      pad_id: id emitted after EOS (static).

    Returns:
      [B, N] int32 generated ids (the EOS itself included).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model = nnx.merge(graphdef, params, frozen)
    if not hasattr(model, "prefill") or not hasattr(model, "decode_step"):
        raise ValueError(f"{type(model).__name__} has no KV-cache generation (prefill / decode_step)")
    batch, length = input_ids.shape
    logits, cache = model.prefill(input_ids, attention_mask, length + max_new_tokens - 1)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    finished = jnp.zeros((batch,), bool) if eos_id is None else first == eos_id

    def step(carry, _):
        token, finished, cache = carry
        logits, cache = model.decode_step(token, cache)
        token = jnp.where(finished, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        if eos_id is not None:
            finished = finished | (token == eos_id)
        return (token, finished, cache), token

    _, rest = jax.lax.scan(step, (first, finished, cache), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def left_pad_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], max_prompt_len: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes prompts (with the tokenizer's special tokens, as in training) and left-pads them.

    A prompt longer than ``max_prompt_len`` tokens keeps its last ``max_prompt_len`` tokens (the
    end of the question and the answer cue, next to where generation starts).

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` with padding and truncation off.
      prompts: N prompts.
      max_prompt_len: P, the padded prompt length.
      pad_id: id placed in padded slots (masked out, so any id works).

    Returns:
      (input_ids, attention_mask), each int32 [N, P], real tokens right-aligned.
    """
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    input_ids = np.full((len(prompts), max_prompt_len), pad_id, np.int32)
    attention_mask = np.zeros((len(prompts), max_prompt_len), np.int32)
    for i, encoding in enumerate(tokenizer.encode_batch(list(prompts))):
        ids = encoding.ids[-max_prompt_len:]
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
        input_ids[i, max_prompt_len - len(ids):] = ids
        attention_mask[i, max_prompt_len - len(ids):] = 1
    return input_ids, attention_mask


def gsm8k_exact_match(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    tokenizer: str | os.PathLike | Tokenizer,
    prompts: Sequence[str],
    references: Sequence[str],
    max_prompt_len: int,
    max_new_tokens: int,
    batch_size: int,
    eos_token: str | None = None,
) -> tuple[float, list[str]]:
    """GSM8K exact-match accuracy of greedy generations from the prompts.

    Prompts are left-padded to ``max_prompt_len`` and generated in batches of ``batch_size``
    (the last batch is filled with copies of the last prompt, so every batch has one static shape
    and the generator compiles once). Generations are cut at the first ``eos_token`` and decoded
    without special tokens.

    Args:
      graphdef, params, frozen: the split model (see :func:`greedy_generate`).
      tokenizer: a ``tokenizers.Tokenizer``, a tokenizer.json, a folder or a hub id (see
        :func:`fedlora_jax.data.tokenise.load_tokenizer`).
      prompts: N prompts (e.g. ``GSM8KSplit.prompts``).
      references: N final answers (``"72"``) or full reference solutions.
      max_prompt_len: P, prompt tokens kept (the last P of longer prompts).
      max_new_tokens: tokens generated per prompt.
      batch_size: prompts per generation call.
      eos_token: the end-of-sequence token, or None to always generate ``max_new_tokens``.

    Returns:
      (accuracy in [0, 1], the N decoded generations).
    """
    if len(prompts) != len(references) or not prompts:
        raise ValueError(f"gsm8k_exact_match: {len(prompts)} prompts vs {len(references)} references")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = load_tokenizer(tokenizer)
    eos_id = None
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
    input_ids, attention_mask = left_pad_prompts(tokenizer, prompts, max_prompt_len)
    n = len(prompts)
    fill = np.full((-n) % batch_size, n - 1)
    rows = np.concatenate([np.arange(n), fill])
    generated = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        tokens = greedy_generate(
            graphdef, params, frozen, jnp.asarray(input_ids[batch]), jnp.asarray(attention_mask[batch]),
            max_new_tokens, eos_id,
        )
        generated.append(np.asarray(tokens))
    tokens = np.concatenate(generated)[:n]
    generations = [tokenizer.decode(_until_eos(row, eos_id), skip_special_tokens=True) for row in tokens]
    return gsm8k_accuracy(generations, list(references)), generations


def _until_eos(tokens: np.ndarray, eos_id: int | None) -> list[int]:
    """The ids of one generated row before its first EOS."""
    ids = tokens.tolist()
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
