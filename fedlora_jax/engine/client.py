"""Local updates: ``local_steps`` optimiser steps of a group of clients, as one pure function.

:func:`train_clients` scans over steps and vmaps over the group's clients inside each step; the
frozen base and every client's rows (stored once, client after client) are closed over unbatched.
Shapes are static: each step samples indices below the largest client's size (masked beyond the
client's own), gathers only those rows, and a step's rows are packed into one of a few static
stream lengths (or run padded). With record-level DP, each step is a DP-SGD step (per-example
gradients of the trainable leaves only, clipped, noised).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedlora_jax.data.packing import example_starts, pack
from fedlora_jax.privacy import poisson_sample, private_gradient, shuffled_batch
from fedlora_jax.privacy.bookkeeping import per_example_gradients
from fedlora_jax.privacy.dpsgd import privatize
from fedlora_jax.tasks import model_losses


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

    def mechanism(self, expected_batch_size, grad_mask) -> dict:
        """Keyword arguments of :func:`fedlora_jax.privacy.dpsgd.privatize` for one client step."""
        return dict(clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier,
                    expected_batch_size=expected_batch_size, per_layer=self.per_layer, grad_mask=grad_mask)


@dataclasses.dataclass(frozen=True)
class StepStreams:
    """How local steps pack their rows (static; :mod:`fedlora_jax.data.packing`).

    ``token_buckets``: packed stream lengths to compile (increasing; empty: no packing). Every step
    packs the sampled rows of the group of clients trained together into the smallest bucket that
    holds them, or runs the padded rows when none does.
    ``score_buckets``: for a causal LM scoring its answers from its hidden states, the scored
    next-token targets each bucket's stream lists (:attr:`fedlora_jax.data.packing.Packing.score_index`;
    a step with more takes a larger bucket); empty: every stream position is scored.
    ``shared``: all the group's clients share one stream (a bucket holds the group's total), else
    each client has its own (a bucket holds the largest client's).
    ``aligned``: streams are aligned to blocks of the row length (encoders).
    """

    token_buckets: tuple[int, ...] = ()
    score_buckets: tuple[int, ...] = ()
    shared: bool = False
    aligned: bool = False


@dataclasses.dataclass(frozen=True)
class LocalTrainer:
    """Static description of local training (hashable; closed over by the jitted round).

    ``streams``: how each step packs its rows (:class:`StepStreams`; the default: padded rows).
    ``bookkeeping``: DP-SGD takes per-example gradients from one batched backward
    (:mod:`fedlora_jax.privacy.bookkeeping`) instead of a vmap over examples.
    ``max_examples``: the largest client's number of rows, the static range clients sample
    indices from (a client's own count masks the rest).
    """

    graphdef: Any
    task: str
    optimizer: optax.GradientTransformation
    schedule: Callable
    local_steps: int
    batch_size: int
    dp: RecordDP | None = None
    streams: StepStreams = StepStreams()
    bookkeeping: bool = False
    max_examples: int = 1

    def loss(self, params, frozen, batch: dict, mask: jax.Array) -> jax.Array:
        """Masked mean of per-example losses."""
        model = nnx.merge(self.graphdef, params, frozen)
        losses = model_losses(model, batch, self.task)
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class LocalStats(NamedTuple):
    """Per-client diagnostics of one local update (computed from raw data: log, never release)."""

    loss: jax.Array  # [C] mean training loss over the steps
    non_finite: jax.Array  # [C] int32, DP-SGD examples whose gradient held NaN or inf (zeroed), over the steps
    overflows: jax.Array  # [C] int32, steps whose Poisson sample overflowed the buffer (rows dropped)


def train_clients(trainer: LocalTrainer, frozen, params, rows: dict, offsets, num_examples, keys, round_index,
                  train_mask, budgets=None):
    """Runs ``local_steps`` optimiser steps on a group of C clients trained together (client c only
    its first ``budgets[c]`` of them: a straggler's later steps leave its state as it was).

    Steps are the outer loop (``lax.scan``) and clients the inner one (``vmap``), so each step can
    choose one packed stream length for the whole group (an unbatched ``lax.switch``).

    Args:
      trainer: static description.
      frozen: frozen base state (unbatched, shared by every client).
      params: the clients' starting trainable states (LoRA factors + head), leaves [C, ...].
      rows: every client's rows, arrays [N, ...] (unbatched).
      offsets: [C] first row of each client in ``rows``.
      num_examples: [C] rows of each client (>= 1).
      keys: [C] the clients' PRNG keys for this round.
      round_index: global round (int scalar), for the learning-rate schedule.
      train_mask: tree like one client's ``params`` of scalars; 0 freezes a leaf.
      budgets: [C] int32 local steps each client runs (None: all ``local_steps``).
    Returns:
      (params after training [C, ...], :class:`LocalStats` over the steps each client ran).
    """
    opt_state = jax.vmap(trainer.optimizer.init)(params)
    stragglers = budgets is not None
    budgets = jnp.full(offsets.shape, trainer.local_steps, jnp.int32) if budgets is None else budgets

    def step(carry, t):
        params, opt_state = carry
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
        losses, grads, non_finite, overflows = _gradients(trainer, frozen, params, rows, offsets, num_examples,
                                                          step_keys, train_mask)
        direction, new_opt_state = jax.vmap(trainer.optimizer.update)(grads, opt_state, params)
        lr = trainer.schedule(round_index * trainer.local_steps + t)
        new_params = jax.tree.map(lambda p, d, m: p - (lr * m * d).astype(p.dtype), params, direction, train_mask)
        ran = t < budgets  # [C]
        if stragglers:  # a straggler past its budget keeps its state
            keep = lambda new, old: jnp.where(ran.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            new_params, new_opt_state = keep_tree(keep, new_params, params), keep_tree(keep, new_opt_state, opt_state)
        return (new_params, new_opt_state), (losses * ran, non_finite * ran, overflows & ran)

    (params, _), (losses, non_finite, overflows) = jax.lax.scan(step, (params, opt_state),
                                                                jnp.arange(trainer.local_steps))
    return params, LocalStats(jnp.sum(losses, axis=0) / jnp.maximum(budgets, 1), jnp.sum(non_finite, axis=0),
                              jnp.sum(overflows.astype(jnp.int32), axis=0))


def keep_tree(keep, new, old):
    """``keep(new_leaf, old_leaf)`` over two trees of one structure (non-array leaves from ``new``)."""
    return jax.tree.map(lambda n, o: keep(n, o) if hasattr(n, "ndim") and n.ndim >= 1 else n, new, old)


def _sample(trainer: LocalTrainer, rows: dict, offset, num_examples, key):
    """One client's step batch: (rows [b, ...], example mask [b] float32, expected batch size,
    whether a Poisson sample overflowed the buffer). Indices are drawn below
    ``trainer.max_examples`` and masked at the client's own count; only the b sampled rows are
    gathered (a masked slot reads the client's first row, which its mask excludes)."""
    capacity = trainer.max_examples
    n = jnp.maximum(num_examples, 1).astype(jnp.float32)
    dp = trainer.dp
    if dp is not None and dp.poisson:
        rate = jnp.minimum(1.0, trainer.batch_size / n)
        indices, mask, overflow = poisson_sample(key, num_examples, rate, dp.buffer_size, capacity)
        expected = rate * n
    else:
        indices, mask = shuffled_batch(key, num_examples, trainer.batch_size, capacity)
        expected = jnp.minimum(1.0, trainer.batch_size / n) * n
        overflow = jnp.zeros((), bool)
    picked = offset + jnp.where(mask > 0, indices, 0)
    return jax.tree.map(lambda x: x[picked], rows), mask.astype(jnp.float32), expected, overflow


def _gradients(trainer: LocalTrainer, frozen, params, client_rows: dict, offsets, num_examples, keys, train_mask):
    """(losses [C], gradients [C, ...], non-finite DP examples [C], Poisson overflows [C] bool) of
    one local step of every client of the group."""
    sample_keys, noise_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    rows, masks, expected, overflows = jax.vmap(functools.partial(_sample, trainer, client_rows))(
        offsets, num_examples, sample_keys)

    def client_gradient(params, batch, mask, expected, key):
        return _client_gradient(trainer, frozen, params, batch, mask, expected, key, train_mask)

    def padded(_):
        return jax.vmap(client_gradient)(params, rows, masks, expected, noise_keys)

    streams = trainer.streams
    if not streams.token_buckets:
        return padded(None) + (overflows,)

    def packed(num_tokens, score_tokens, _):
        batches, _ = jax.vmap(lambda r, m: pack(r, m, num_tokens, aligned=streams.aligned,
                                                score_tokens=score_tokens))(rows, masks)
        return jax.vmap(client_gradient)(params, batches, masks, expected, noise_keys)

    def shared(num_tokens, score_tokens, _):
        clients = masks.shape[0]
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), rows)
        batch, _ = pack(flat, masks.reshape(-1), num_tokens, clients, streams.aligned, score_tokens)
        return _shared_gradients(trainer, frozen, params, batch, masks, expected, noise_keys, train_mask)

    real = rows["attention_mask"].astype(jnp.int32) * masks.astype(jnp.int32)[..., None]  # [C, b, L]
    block = rows["attention_mask"].shape[-1] if streams.aligned else None
    share = streams.shared and masks.shape[0] > 1
    if share:
        need = example_starts(jnp.sum(real, axis=2).reshape(-1), block)[1]
    else:
        need = jnp.max(jax.vmap(lambda n: example_starts(n, block)[1])(jnp.sum(real, axis=2)))
    bucket = jnp.searchsorted(jnp.asarray(streams.token_buckets), need)  # == len(buckets): padded
    scores = streams.score_buckets or (0,) * len(streams.token_buckets)
    if streams.score_buckets:  # the scored targets: token t >= 1 of an example, where its loss mask is set
        targets = real[:, :, 1:] * rows.get("loss_mask", rows["attention_mask"])[:, :, 1:].astype(jnp.int32)
        per_client = jnp.sum(targets, axis=(1, 2))
        scored_need = jnp.sum(per_client) if share else jnp.max(per_client)  # one stream, or the largest client's
        bucket = jnp.maximum(bucket, jnp.searchsorted(jnp.asarray(streams.score_buckets), scored_need))
    stream = shared if share else packed
    branches = [functools.partial(stream, t, s) for t, s in zip(streams.token_buckets, scores)] + [padded]
    return jax.lax.switch(bucket, branches, None) + (overflows,)


def _shared_gradients(trainer: LocalTrainer, frozen, params, batch: dict, masks, expected, keys, train_mask):
    """(losses [C], gradients [C, ...], non-finite DP examples [C]) of C clients whose step batches
    share one packed stream (``batch``, ``packing.clients == C``; ``masks`` [C, b]): one forward
    and backward for the group.

    The total of the clients' losses is differentiated with respect to the stacked trainable
    leaves [C, ...]; client c's loss depends only on its own leaves, so slice c of the gradient
    is client c's gradient. With DP-SGD the per-example gradients come from book-keeping.
    """
    clients, rows = masks.shape
    flat_mask = masks.reshape(-1)
    dp = trainer.dp
    if dp is None:
        def total(params):
            model = nnx.merge(trainer.graphdef, params, frozen)
            losses = model_losses(model, batch, trainer.task).reshape(clients, rows)
            client_losses = jnp.sum(losses * masks, axis=1) / jnp.maximum(jnp.sum(masks, axis=1), 1.0)
            return jnp.sum(client_losses), client_losses

        (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
        return losses, _masked(grads, train_mask), jnp.zeros(clients, jnp.int32)
    losses, per_example = per_example_gradients(trainer.graphdef, params, frozen, batch, flat_mask, trainer.task)
    per_client = jax.tree.map(lambda g: g.reshape((clients, rows) + g.shape[1:]), per_example)

    def privatized(per_example, losses, mask, expected, key):
        grads, stats = privatize(per_example, losses, mask, key, **dp.mechanism(expected, train_mask))
        return stats.mean_loss, grads, stats.num_non_finite

    return jax.vmap(privatized)(per_client, losses.reshape(clients, rows), masks, expected, keys)


def _masked(grads, train_mask):
    """Gradients with the frozen leaves (mask 0) zeroed."""
    return jax.tree.map(lambda g, m: g * m.astype(g.dtype), grads, train_mask)


def _client_gradient(trainer: LocalTrainer, frozen, params, batch: dict, mask, expected, key, train_mask):
    """(loss, gradient, non-finite DP examples) of one client's step batch (padded rows or packed);
    DP-SGD when ``trainer.dp`` is set."""
    dp = trainer.dp
    if dp is None:
        loss, grads = jax.value_and_grad(trainer.loss)(params, frozen, batch, mask)
        return loss, _masked(grads, train_mask), jnp.int32(0)
    options = dp.mechanism(expected, train_mask)
    if trainer.bookkeeping:
        losses, per_example = per_example_gradients(trainer.graphdef, params, frozen, batch, mask, trainer.task)
        grads, stats = privatize(per_example, losses, mask, key, **options)
        return stats.mean_loss, grads, stats.num_non_finite
    if "packing" in batch:
        raise ValueError("packed DP-SGD needs book-keeping per-example gradients")

    def example_loss(p, example):
        return trainer.loss(p, frozen, jax.tree.map(lambda x: x[None], example), jnp.ones((1,), jnp.float32))

    grads, stats = private_gradient(example_loss, params, batch, mask, key, **options)
    return stats.mean_loss, grads, stats.num_non_finite
