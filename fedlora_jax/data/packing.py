"""Sequence packing: a step's real tokens laid end to end in one static token buffer.

A padded batch holds b rows of L tokens, of which only the first ``length_i`` of row i are real
(rows are right-padded). Packing lays the real tokens of all rows end to end in a stream of T
tokens (T much smaller than b L on short-text data), with

* ``segment_ids`` [1, T]: i + 1 on the tokens of row i, 0 on the unused tail;
* ``positions`` [1, T]: each token's position inside its own row (0, 1, ...);
* ``starts`` / ``lengths`` [b]: where each row's tokens begin in the stream, and how many.

Models attend only within a segment (block-diagonal attention), so every real token sees exactly
what it saw in the padded row, and sequence-level outputs (pooling, per-example losses) are read
back per segment: losses and gradients equal the padded computation up to float rounding. The
dense layers, where nearly all FLOPs are, then run on real tokens only.

Several clients can share one stream (``clients`` > 1): their examples are laid out client after
client, each client owning ``b / clients`` consecutive example slots, and the trainable layers
apply each token's own client's parameters (:func:`fedlora_jax.models.lora.route_clients`). A step
of C clients then runs its dense layers once, on the sum of the clients' real tokens, instead of C
times on the largest client's.

An *aligned* stream (``aligned``, for encoders) never lets an example cross a boundary of the
blocks of L stream tokens (L the padded row length): each example goes into the first block with
room for it, leaving a few unused tokens at the end of some blocks. Attention then runs inside
each block of L tokens, L keys per query as in the padded rows, instead of over the whole stream.

Packing is a gather (no sort; aligned placement is a short scan over the examples), so it is
cheap inside ``jit`` and under ``vmap``.
Shapes are static: a batch whose tokens do not fit the buffer is reported by ``fits`` and the
caller takes a larger buffer (see :func:`token_buckets`).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

TOKEN_KEYS = ("input_ids", "token_type_ids", "loss_mask")  # per-token arrays carried into the stream


@flax.struct.dataclass
class Packing:
    """Where each example of a packed stream lives (a pytree; the model's ``packing`` argument).

    segment_ids: [1, T] int32, i + 1 on example i's tokens, 0 on unused tokens.
    positions: [1, T] int32, position of each token inside its example.
    starts: [b] int32, stream index of each example's first token.
    lengths: [b] int32, real tokens of each example (0 for an empty slot).
    score_index: [S] int32 or None, the stream positions whose output is scored against the next
      token (causal LM, :func:`pack` with ``score_tokens``), in order, then T - 1 (never scored).
    row_length: L, the longest an example can be (static).
    clients: C, the clients sharing the stream (static); client c owns examples
      [c b / C, (c + 1) b / C).
    aligned: no example crosses a boundary of the blocks of L stream tokens (static).
    """

    segment_ids: jax.Array
    positions: jax.Array
    starts: jax.Array
    lengths: jax.Array
    score_index: jax.Array | None = None
    row_length: int = flax.struct.field(pytree_node=False, default=0)
    clients: int = flax.struct.field(pytree_node=False, default=1)
    aligned: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_examples(self) -> int:
        return self.starts.shape[0]

    def token_clients(self) -> jax.Array:
        """Client of each stream token, [T] int32 (``clients`` on unused tokens)."""
        per_client = self.num_examples // self.clients
        segments = self.segment_ids[0]
        return jnp.where(segments > 0, (segments - 1) // per_client, self.clients).astype(jnp.int32)

    def example_tokens(self) -> tuple[jax.Array, jax.Array]:
        """Stream index of token l of example i, [b, L] int32 (clamped to the stream), and a [b, L]
        bool mask of the real ones: the inverse of packing."""
        offsets = jnp.arange(self.row_length, dtype=jnp.int32)
        index = jnp.minimum(self.starts[:, None] + offsets, self.segment_ids.shape[1] - 1)
        return index, offsets < self.lengths[:, None]

    def scored_next(self, loss_mask: jax.Array | None) -> jax.Array:
        """[T] bool: the output at stream token t is scored on token t + 1, which is a scored
        (``loss_mask`` [1, T], None: every real token) token of the same example (False at T - 1)."""
        segments = self.segment_ids[0]
        same = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
        scored = same if loss_mask is None else same & (loss_mask[0, 1:] > 0)
        return jnp.append(scored, False)

    def segment_matrix(self, dtype=jnp.float32) -> jax.Array:
        """One-hot [b, T]: entry (i, t) is 1 where stream token t belongs to example i."""
        examples = jnp.arange(1, self.num_examples + 1, dtype=jnp.int32)
        return (self.segment_ids[0][None, :] == examples[:, None]).astype(dtype)


def example_starts(lengths: jax.Array, block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(starts [b], end) of examples of ``lengths`` [b] (each at most ``block``) in a stream.

    Without ``block`` they lie end to end, in order. With ``block`` the stream is aligned: each
    example goes, in order, into the first block of ``block`` tokens with room for it (first fit),
    so none crosses a block boundary and little is left unused. ``end`` is the stream length the
    examples need.
    """
    if block is None:
        return jnp.cumsum(lengths) - lengths, jnp.sum(lengths)

    def place(fill, n):  # fill: tokens used in each block
        first = jnp.argmax(fill + n <= block)  # an empty block always has room
        return fill.at[first].add(n), first * block + fill[first]

    fill, starts = jax.lax.scan(place, jnp.zeros(lengths.shape, lengths.dtype), lengths)
    last = fill.shape[0] - 1 - jnp.argmax(fill[::-1] > 0)
    return starts, jnp.where(jnp.any(fill > 0), last * block + fill[last], 0)


def pack(rows: dict, example_mask: jax.Array, num_tokens: int, clients: int = 1,
         aligned: bool = False, score_tokens: int = 0) -> tuple[dict, jax.Array]:
    """Packs the real tokens of a right-padded batch into a stream of ``num_tokens``.

    Args:
      rows: a batch dict: ``attention_mask`` [b, L] (1 on each row's real prefix), per-token
        arrays (``input_ids``, optional ``token_type_ids``, ``loss_mask``) [b, L], and per-example
        arrays (e.g. ``labels`` [b]) carried through unchanged.
      example_mask: [b], 1 (or True) for a sampled example; a 0 row contributes no tokens.
      num_tokens: T, the static stream length.
      clients: C, clients sharing the stream (b a multiple of C; the rows of client c are
        [c b / C, (c + 1) b / C)).
      aligned: no example crosses a boundary of the blocks of L tokens (L = the rows' length).
      score_tokens: S > 0: list the S positions whose next token is scored (causal LM; see
        :attr:`Packing.score_index`).

    Returns:
      (batch, fits): ``batch`` holds the per-token arrays as [1, T], the per-example arrays as
      they were, ``example_mask`` [b] float32 and ``packing`` (a :class:`Packing`); ``fits`` is a
      bool scalar, False when the real tokens exceed T or the scored ones S (the stream is then
      cut and must not be used).
    """
    row_length = rows["attention_mask"].shape[-1]
    lengths = jnp.sum(rows["attention_mask"].astype(jnp.int32), axis=-1) * example_mask.astype(jnp.int32)
    if lengths.shape[0] % clients:
        raise ValueError(f"{lengths.shape[0]} rows cannot be split evenly between {clients} clients")
    starts, end = example_starts(lengths, row_length if aligned else None)
    stream = jnp.arange(num_tokens, dtype=jnp.int32)
    inside = (stream[:, None] >= starts[None, :]) & (stream[:, None] < (starts + lengths)[None, :])  # [T, b]
    example = jnp.argmax(inside, axis=1)  # the example holding stream token t
    is_real = jnp.any(inside, axis=1)
    offset = jnp.where(is_real, stream - starts[example], 0)
    segment_ids = jnp.where(is_real, example + 1, 0).astype(jnp.int32)
    batch = {}
    for name, values in rows.items():
        if name == "attention_mask":
            continue
        if name in TOKEN_KEYS:
            batch[name] = jnp.where(is_real, values[example, offset], 0)[None].astype(values.dtype)
        else:
            batch[name] = values
    batch["example_mask"] = example_mask.astype(jnp.float32)
    packing = Packing(segment_ids[None], offset[None].astype(jnp.int32), starts.astype(jnp.int32),
                      lengths.astype(jnp.int32), None, row_length, clients, aligned)
    fits = end <= num_tokens
    if score_tokens:
        scored = packing.scored_next(batch.get("loss_mask"))
        index = jnp.nonzero(scored, size=score_tokens, fill_value=num_tokens - 1)[0].astype(jnp.int32)
        packing = packing.replace(score_index=index)
        fits &= jnp.sum(scored) <= score_tokens
    batch["packing"] = packing
    return batch, fits


def row_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """Real tokens per row, [N] int (host-side)."""
    return np.asarray(attention_mask).astype(bool).sum(axis=-1)


def stream_length(lengths: np.ndarray, block: int | None = None) -> np.ndarray:
    """Tokens a stream needs for examples of ``lengths`` [..., n] (host-side mirror of
    :func:`example_starts`): their sum, or with ``block`` the end of the aligned stream. Returns [...]."""
    lengths = np.asarray(lengths, np.int64)
    if block is None:
        return lengths.sum(axis=-1)
    flat = lengths.reshape(-1, lengths.shape[-1])
    fill = np.zeros(flat.shape, np.int64)
    rows = np.arange(flat.shape[0])
    for n in flat.T:
        fill[rows, np.argmax(fill + n[:, None] <= block, axis=1)] += n
    used = fill > 0
    last = fill.shape[1] - 1 - np.argmax(used[:, ::-1], axis=1)
    end = np.where(used.any(axis=1), last * block + fill[rows, last], 0)
    return end.reshape(lengths.shape[:-1])


def _simulated_steps(client_sizes: Sequence[int], rows_per_step: int, clients_per_step: int,
                     sampling_rates: Sequence[float] | None, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clients [draws, group], rows [draws, group, b]) of simulated local steps: clients drawn at
    random, rows by the engine's sampling (``rows_per_step`` without replacement, or Poisson with
    ``sampling_rates`` into a buffer of ``rows_per_step``); -1 marks an empty slot (host-side)."""
    rng = np.random.default_rng(seed)
    group = min(clients_per_step, len(client_sizes))
    clients = np.zeros((draws, group), np.int64)
    rows = np.full((draws, group, rows_per_step), -1, np.int64)
    for d in range(draws):
        clients[d] = rng.choice(len(client_sizes), size=group, replace=False)
        for j, u in enumerate(clients[d]):
            if sampling_rates is None:
                picked = rng.choice(client_sizes[u], size=min(rows_per_step, client_sizes[u]), replace=False)
            else:
                sampled = np.flatnonzero(rng.random(client_sizes[u]) < sampling_rates[u])
                picked = rng.permutation(sampled)[:rows_per_step]
            rows[d, j, : len(picked)] = picked
    return clients, rows


def _step_values(per_client: Sequence[np.ndarray], clients: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[draws, group, b] per-row values (0 for an empty slot) of simulated steps."""
    values = np.zeros(rows.shape, np.int64)
    for index in np.ndindex(clients.shape):
        picked = rows[index]
        values[index][picked >= 0] = per_client[clients[index]][picked[picked >= 0]]
    return values


def token_buckets(
    client_lengths: Sequence[np.ndarray],
    rows_per_step: int,
    clients_per_step: int,
    max_length: int,
    sampling_rates: Sequence[float] | None = None,
    quantiles: Sequence[float] = (0.25, 0.5, 0.75, 0.95, 0.99999),
    draws: int = 4000,
    multiple: int = 16,
    seed: int = 0,
    shared: bool = False,
    aligned: bool = False,
    client_scored: Sequence[np.ndarray] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Stream lengths to compile, from the distribution of a step's real tokens (host-side).

    Every local step packs the ``clients_per_step`` clients trained together (a chunk) either each
    into its own stream of one common length, so the length a step needs is the largest client
    total, or (``shared``) all into one stream, which needs the sum of the client totals. This
    draws that need ``draws`` times from the real client data (clients drawn at random, rows by
    the engine's sampling: ``rows_per_step`` rows without replacement, or Poisson with
    ``sampling_rates``), and returns its ``quantiles`` rounded up to ``multiple`` tokens,
    deduplicated and below the padded size (``rows_per_step * max_length``, times the clients when
    shared), which is always the last resort and is not included. A step takes the smallest bucket
    that holds it.

    With ``client_scored`` (per client, the scored next-token targets of each row: a causal LM
    scoring its answers only), each bucket also gets a scored-token count S: the 99.9% quantile of
    the scored need of the simulated steps that fit the bucket's length (at least the previous
    bucket's), so a step holding more scored tokens takes a larger bucket.

    Args:
      client_lengths: per client, the real token count of each of its rows.
      rows_per_step: b, rows sampled per client step (the Poisson buffer size under Poisson).
      clients_per_step: clients packed with one shared length (the chunk).
      max_length: L, the padded row length.
      sampling_rates: per-client Poisson rates q_u, or None for shuffled fixed-size batches.
      quantiles: quantiles of the step maximum that become buckets.
      draws: simulated steps.
      multiple: bucket granularity in tokens.
      seed: simulation seed.
      shared: the chunk's clients share one stream.
      aligned: streams are aligned to blocks of ``max_length`` tokens (see :func:`pack`).
      client_scored: per client, scored targets of each row (None: no scored counts).

    Returns:
      (increasing bucket lengths, possibly empty when packing cannot beat padding; their scored
      counts, empty without ``client_scored``).
    """
    clients, rows = _simulated_steps([len(n) for n in client_lengths], rows_per_step, clients_per_step,
                                     sampling_rates, draws, seed)
    sampled = _step_values(client_lengths, clients, rows)  # each step's row lengths, in stream order
    block = max_length if aligned else None
    if shared:
        needs = stream_length(sampled.reshape(draws, -1), block)
    else:
        needs = stream_length(sampled, block).max(axis=1)
    padded = rows_per_step * max_length * (clients.shape[1] if shared else 1)
    round_up = lambda x: multiple * math.ceil(max(1.0, float(x)) / multiple)  # noqa: E731
    buckets = tuple(sorted({min(padded, round_up(np.quantile(needs, q))) for q in quantiles} - {padded}))
    if client_scored is None or not buckets:
        return buckets, ()
    scored = _step_values(client_scored, clients, rows).sum(axis=2)
    scored = scored.sum(axis=1) if shared else scored.max(axis=1)
    counts, previous = [], 0
    for bucket in buckets:
        previous = max(previous, min(bucket, round_up(np.quantile(scored[needs <= bucket], 0.999))))
        counts.append(previous)
    return buckets, tuple(counts)


def eval_stream_length(attention_mask: np.ndarray, examples_per_batch: int, multiple: int = 16) -> int:
    """Stream length for packed evaluation batches of up to ``examples_per_batch`` examples: the
    mean need of a full batch, at least one longest row (host-side)."""
    lengths = row_lengths(attention_mask)
    need = max(
        float(lengths.mean()) * examples_per_batch if lengths.size else 0.0, float(attention_mask.shape[-1]), 1.0
    )
    return multiple * math.ceil(need / multiple)


def pack_groups(
    attention_mask: np.ndarray, examples_per_batch: int, num_tokens: int, aligned: bool = True
) -> np.ndarray:
    """Which rows :func:`pack_examples` puts in each stream (host-side, nothing packed):
    index [nb, examples_per_batch] int64 of rows in order, -1 for empty slots."""
    lengths = row_lengths(attention_mask)
    block = attention_mask.shape[-1] if aligned else None
    if lengths.max(initial=0) > num_tokens:
        raise ValueError(f"a row of {lengths.max()} tokens does not fit a stream of {num_tokens}")
    capacity = block or num_tokens  # first fit into blocks (one block when unaligned), as example_starts
    groups, current, fill = [], [], []  # fill: tokens used in each block of the current stream
    for i, n in enumerate(lengths):
        j = next((k for k, used in enumerate(fill) if used + n <= capacity), len(fill))
        if current and (
            len(current) == examples_per_batch or capacity * j + n + (fill[j] if j < len(fill) else 0) > num_tokens
        ):
            groups.append(current)
            current, fill, j = [], [], 0
        if j == len(fill):
            fill.append(0)
        fill[j] += int(n)
        current.append(i)
    groups.append(current)
    index = np.full((len(groups), examples_per_batch), -1, np.int64)
    for g, rows in enumerate(groups):
        index[g, : len(rows)] = rows
    return index


def pack_examples(
    arrays: dict, examples_per_batch: int, num_tokens: int, aligned: bool = True
) -> tuple[dict, np.ndarray]:
    """Packs a fixed set of right-padded rows (a test set) into batches of one stream each (host-side).

    Examples are taken in order; a batch closes when the next example would overflow
    ``num_tokens`` or it holds ``examples_per_batch`` examples. Streams are ``aligned`` (see
    :func:`pack`) unless told otherwise.

    Returns:
      (batches, index): ``batches`` is a packed batch (see :func:`pack`) with a leading [nb] axis;
      ``index`` [nb, examples_per_batch] int64 holds the row of each slot (-1: empty).
    """
    index = pack_groups(arrays["attention_mask"], examples_per_batch, num_tokens, aligned)
    rows = {k: np.asarray(v)[np.maximum(index, 0)] for k, v in arrays.items()}
    return jax.device_get(_pack_batches(rows, index >= 0, num_tokens, aligned)), index


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pack_batches(rows: dict, valid, num_tokens: int, aligned: bool) -> dict:
    """:func:`pack` of each batch of rows [nb, E, L] (``valid`` [nb, E]); jitted once per shape."""
    return jax.vmap(lambda r, m: pack(r, m, num_tokens, aligned=aligned)[0])(rows, valid)
