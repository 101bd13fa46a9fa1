"""A client's local update: ``local_steps`` optimiser steps on its own shard, as one pure function.

The engine vmaps :func:`local_update` over the cohort's client axis; the frozen base is closed
over unbatched. Everything here has static shapes: a client's shard is padded to n_max rows and
batches are index gathers with a mask. With record-level DP, each step is a DP-SGD step
(per-example gradients of the trainable leaves only, clipped, noised).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedlora_jax.config import OptimConfig
from fedlora_jax.privacy import poisson_sample, private_gradient, shuffled_batch
from fedlora_jax.tasks import forward, per_example_loss


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optimiser's update direction, without the learning rate (applied per step by
    :func:`local_update` from the schedule), so p <- p - lr(t) * direction."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    if cfg.name == "sgd":
        parts.append(optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity())
    else:
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay and cfg.name in ("adamw", "sgd"):
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    return optax.chain(*parts)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the global step round * local_steps + step."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        main = optax.linear_schedule(peak, 0.0, decay_steps)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


@dataclasses.dataclass(frozen=True)
class RecordDP:
    """Record-level DP-SGD settings of every client (static).

    Each step samples a client's examples with rate q_u = min(1, batch_size / n_u), either by
    Poisson sampling into a ``buffer_size`` buffer (what the accountant assumes) or as a
    shuffled fixed-size batch, and privatises the gradient with
    :func:`fedlora_jax.privacy.private_gradient` (expected batch q_u * n_u).
    """

    clip_norm: float
    noise_multiplier: float
    per_layer: bool = False
    poisson: bool = True
    buffer_size: int = 0


@dataclasses.dataclass(frozen=True)
class LocalTrainer:
    """Static description of local training (hashable; closed over by the jitted round)."""

    graphdef: Any
    task: str
    optimizer: optax.GradientTransformation
    schedule: Callable
    local_steps: int
    batch_size: int
    dp: RecordDP | None = None

    def loss(self, params, frozen, batch: dict, mask: jax.Array) -> jax.Array:
        """Masked mean of per-example losses."""
        model = nnx.merge(self.graphdef, params, frozen)
        losses = per_example_loss(forward(model, batch), batch, self.task)
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def local_update(trainer: LocalTrainer, frozen, params, data: dict, num_examples, key, round_index, train_mask):
    """Runs ``local_steps`` steps of the optimiser on one client (``lax.scan`` over steps).

    Args:
      trainer: static description.
      frozen: frozen base state (unbatched).
      params: the client's starting trainable state (LoRA factors + head).
      data: the client's shard, arrays [n_max, ...].
      num_examples: real rows in the shard (int scalar).
      key: the client's PRNG key for this round.
      round_index: global round (int scalar), for the learning-rate schedule.
      train_mask: tree like ``params`` of scalars; 0 freezes a leaf (no gradient, no update).
    Returns:
      (params after training, mean training loss over the steps).
    """
    opt_state = trainer.optimizer.init(params)

    def step(carry, t):
        params, opt_state = carry
        loss, grads = _gradient(trainer, frozen, params, data, num_examples, jax.random.fold_in(key, t), train_mask)
        direction, opt_state = trainer.optimizer.update(grads, opt_state, params)
        lr = trainer.schedule(round_index * trainer.local_steps + t)
        params = jax.tree.map(lambda p, d, m: p - (lr * m * d).astype(p.dtype), params, direction, train_mask)
        return (params, opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(trainer.local_steps))
    return params, jnp.mean(losses)


def _gradient(trainer: LocalTrainer, frozen, params, data: dict, num_examples, key, train_mask):
    """(loss, gradient) of one local step; DP-SGD when ``trainer.dp`` is set."""
    capacity = jax.tree.leaves(data)[0].shape[0]
    batch_key, noise_key = jax.random.split(key)
    dp = trainer.dp
    if dp is None or not dp.poisson:
        indices, mask = shuffled_batch(batch_key, num_examples, trainer.batch_size, capacity)
    if dp is None:
        batch = jax.tree.map(lambda x: x[indices], data)
        loss, grads = jax.value_and_grad(trainer.loss)(params, frozen, batch, mask.astype(jnp.float32))
        return loss, jax.tree.map(lambda g, m: g * m.astype(g.dtype), grads, train_mask)
    n = jnp.maximum(num_examples, 1).astype(jnp.float32)
    rate = jnp.minimum(1.0, trainer.batch_size / n)
    if dp.poisson:
        indices, mask = poisson_sample(batch_key, num_examples, rate, dp.buffer_size, capacity)
    batch = jax.tree.map(lambda x: x[indices], data)

    def example_loss(p, example):
        return trainer.loss(p, frozen, jax.tree.map(lambda x: x[None], example), jnp.ones((1,), jnp.float32))

    grads, stats = private_gradient(example_loss, params, batch, mask, noise_key, clip_norm=dp.clip_norm,
                                    noise_multiplier=dp.noise_multiplier, expected_batch_size=rate * n,
                                    per_layer=dp.per_layer, grad_mask=train_mask)
    return stats.mean_loss, grads
