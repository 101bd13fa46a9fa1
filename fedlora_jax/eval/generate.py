"""Greedy and sampled generation with a KV cache, and GSM8K exact match of the answers.

:func:`generate` (greedy when ``temperature`` is 0, else sampled) works on the split NNX states
the engine holds (graphdef, trainable state, frozen state) and merges them inside one jitted
function: a prefill of the prompts into a static-shape
:class:`~fedlora_jax.models.llama.KVCache`, then a ``lax.scan`` of ``max_new_tokens - 1``
single-token decode steps. Prompts are left-padded by convention (any padding works: the cache
path uses real positions, see :mod:`fedlora_jax.models.llama`). :func:`generate_texts`
tokenises, left-pads and batches prompts on the host, generates and decodes;
:func:`gsm8k_exact_match` scores the final numbers with
:func:`fedlora_jax.eval.metrics.gsm8k_accuracy`.
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


def greedy_generate(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, input_ids: jax.Array,
                    attention_mask: jax.Array, max_new_tokens: int, eos_id: int | None = None,
                    pad_id: int = 0) -> jax.Array:
    """Greedy (argmax) continuation of a batch of prompts: :func:`generate` at temperature 0."""
    return generate(graphdef, params, frozen, input_ids, attention_mask, max_new_tokens, eos_id, pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id", "temperature"))
def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Continuation of a batch of prompts with a KV cache, greedy or sampled; jitted.

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
      temperature: 0 for greedy (argmax); > 0 samples from softmax(logits / temperature) (static).
      key: PRNG key of the sampling (needed when temperature > 0).

    Returns:
      [B, N] int32 generated ids (the EOS itself included).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model = nnx.merge(graphdef, params, frozen)
    if not hasattr(model, "prefill") or not hasattr(model, "decode_step"):
        raise ValueError(f"{type(model).__name__} has no KV-cache generation (prefill / decode_step)")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    keys = jax.random.split(key, max_new_tokens) if temperature > 0 else jnp.zeros((max_new_tokens,))

    def choose(logits, step_key):
        if temperature > 0:
            return jax.random.categorical(step_key, logits.astype(jnp.float32) / temperature).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    batch, length = input_ids.shape
    logits, cache = model.prefill(input_ids, attention_mask, length + max_new_tokens - 1)
    first = choose(logits, keys[0])
    finished = jnp.zeros((batch,), bool) if eos_id is None else first == eos_id

    def step(carry, step_key):
        token, finished, cache = carry
        logits, cache = model.decode_step(token, cache)
        token = jnp.where(finished, pad_id, choose(logits, step_key))
        if eos_id is not None:
            finished = finished | (token == eos_id)
        return (token, finished, cache), token

    _, rest = jax.lax.scan(step, (first, finished, cache), keys[1:])
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
    generations = generate_texts(graphdef, params, frozen, tokenizer, prompts, max_prompt_len, max_new_tokens,
                                 batch_size, eos_token)
    return gsm8k_accuracy(generations, list(references)), generations


def generate_texts(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    tokenizer: str | os.PathLike | Tokenizer,
    prompts: Sequence[str],
    max_prompt_len: int,
    max_new_tokens: int,
    batch_size: int,
    eos_token: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Decoded continuations of N prompts, generated in batches of one static shape.

    Prompts are left-padded to ``max_prompt_len`` and generated in batches of ``batch_size``
    (the last batch filled with copies of the last prompt, so the generator compiles once);
    generations are cut at the first ``eos_token`` and decoded without special tokens. Greedy
    when ``temperature`` is 0, else sampled (batch b with key fold_in(key(seed), b)).
    """
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
        key = jax.random.fold_in(jax.random.key(seed), start) if temperature > 0 else None
        tokens = generate(
            graphdef, params, frozen, jnp.asarray(input_ids[batch]), jnp.asarray(attention_mask[batch]),
            max_new_tokens, eos_id, temperature=temperature, key=key,
        )
        generated.append(np.asarray(tokens))
    tokens = np.concatenate(generated)[:n]
    return [tokenizer.decode(_until_eos(row, eos_id), skip_special_tokens=True) for row in tokens]


def _until_eos(tokens: np.ndarray, eos_id: int | None) -> list[int]:
    """The ids of one generated row before its first EOS."""
    ids = tokens.tolist()
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
