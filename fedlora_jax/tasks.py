"""Forward pass, per-example losses and predictions for each task kind.

A batch is a dict with ``input_ids`` [b, L], ``attention_mask`` [b, L], optional
``token_type_ids`` [b, L], and ``labels``: [b] int (classification), [b] float (regression) or
absent for causal LM, where the targets are the next tokens and ``loss_mask`` [b, L] (optional,
default the attention mask) marks the positions whose next token is scored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def forward(model, batch: dict) -> jax.Array:
    """Logits: [b, num_labels] for classification / regression, [b, L, V] for causal LM."""
    if "token_type_ids" in batch:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return model(batch["input_ids"], batch["attention_mask"])


def per_example_loss(logits: jax.Array, batch: dict, task: str) -> jax.Array:
    """Loss of each example, [b]. Causal LM: mean token cross-entropy over scored positions."""
    logits = logits.astype(jnp.float32)
    if task == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    if task == "regression":
        return jnp.square(logits[..., 0] - batch["labels"].astype(jnp.float32))
    if task == "causal_lm":
        targets = batch["input_ids"][:, 1:]
        scored = batch.get("loss_mask", batch["attention_mask"])[:, 1:].astype(jnp.float32)
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
        return jnp.sum(token_loss * scored, axis=-1) / jnp.maximum(jnp.sum(scored, axis=-1), 1.0)
    raise ValueError(f"unknown task {task!r}")


def predictions(logits: jax.Array, task: str) -> jax.Array:
    """Class ids [b], regression values [b], or next-token ids [b, L-1] for causal LM."""
    if task == "classification":
        return jnp.argmax(logits, axis=-1)
    if task == "regression":
        return logits[..., 0].astype(jnp.float32)
    return jnp.argmax(logits[:, :-1], axis=-1)
