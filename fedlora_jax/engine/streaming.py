"""A round that never forms the cohort's trained states: chunks of clients are trained and their
uploads reduced into running sums as each finishes (streaming methods, :attr:`Federation.streams`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.engine import uploads
from fedlora_jax.engine.aggregate import summarise_chunk
from fedlora_jax.engine.client import train_clients
from fedlora_jax.engine.cohort import split_chunks
from fedlora_jax.engine.state import ServerState


def stream_totals(federation, state: ServerState, rows: dict, cohort, offsets, counts, keys, weights, budgets,
                  train_mask):
    """Trains the given clients of ``federation``'s round chunk by chunk and reduces each chunk's
    uploads into running sums as it goes (``lax.scan``; a last smaller chunk takes the remainder),
    so no [K, ...] trained state is ever formed. Returns (totals of :func:`summarise_chunk`, local
    stats). ``budgets``: [K] local steps of each client, or None (all)."""
    method, layout, trainer = federation.method, federation.layout, federation.trainer

    def train_and_summarise(args):
        ids, first, n, key, w, budget = args
        start = method.client_start(state.method_state, state.params, ids, layout)
        trained, stats = train_clients(trainer, state.frozen, start, rows, first, n, key, state.round,
                                       train_mask, budget)
        trained, _ = uploads.received(federation.compression, method, layout, start, trained, state.round, key)
        return summarise_chunk(method, layout, trained, w), stats

    grouped, rest = split_chunks((cohort, offsets, counts, keys, weights, budgets), federation.clients_per_chunk)
    if grouped is None:
        return train_and_summarise(rest)
    first = jax.tree.map(lambda x: x[0], grouped)
    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(train_and_summarise, first)[0])

    def body(total, group):
        summary, stats = train_and_summarise(group)
        return jax.tree.map(jnp.add, total, summary), stats

    total, stats = jax.lax.scan(body, zero, grouped)
    stats = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stats)
    if rest is not None:
        summary, rest_stats = train_and_summarise(rest)
        total = jax.tree.map(jnp.add, total, summary)
        stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), stats, rest_stats)
    return total, stats
