"""What the server receives from the cohort: the uploaded leaves of each client's trained state,
through the run's upload compression (:mod:`fedlora_jax.aggregation.compression`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation.compression import Compression
from fedlora_jax.methods import LoraBytes, Method
from fedlora_jax.params import TrainableLayout, leaf_bytes

_UPLOAD_STREAM = 0x75706C64  # folded into a client's training key for its uploads' randomness ("upld")


def uploaded_leaves(method: Method, layout: TrainableLayout, round_index, num_leaves: int) -> list:
    """Per trainable leaf (of ``num_leaves``), whether clients upload it this round (``round_index``
    may be traced: a flag may be a traced bool): the method's A and/or B of every module, and every
    other leaf (the head)."""
    send_a, send_b = method.uploads(round_index)
    flags = [True] * num_leaves
    for m in layout.modules:
        flags[m.a_index], flags[m.b_index] = send_a, send_b
    return flags


def received(compression: Compression | None, method: Method, layout: TrainableLayout, start, trained,
             round_index, keys, residuals=None):
    """The cohort's states as the server decodes them, and (error feedback) what each client keeps
    back for its next upload.

    Each uploaded leaf (:func:`uploaded_leaves`) arrives as start + the decoded message of its
    update (trained - start), plus the client's residual with error feedback, compressed
    independently per client and leaf; the client's new residual is what its message did not
    carry ((update + residual) - decoded). A leaf the client keeps (e.g. FedSA's B, FFA's frozen
    A) stays as trained and its residual as it was. Without compression: ``trained``.

    Args:
      compression: the scheme, or None.
      method, layout: what is uploaded and where the factors are.
      start: the states the clients started from, leaves [K, ...] (what the server sent).
      trained: the clients' trained states, leaves [K, ...].
      round_index: the round (may be traced).
      keys: [K] the clients' training keys (their upload randomness is folded from them).
      residuals: the cohort's residuals, leaves [K, ...] float32, or None (no error feedback).

    Returns:
      (decoded states [K, ...], new residuals [K, ...] or None).
    """
    if compression is None:
        return trained, residuals
    upload_keys = jax.vmap(lambda k: jax.random.fold_in(k, _UPLOAD_STREAM))(keys)
    leaves, treedef = jax.tree.flatten(trained)
    kept = [None] * len(leaves) if residuals is None else jax.tree.leaves(residuals)
    out, left = [], []
    for i, (sent, begin, after, owed) in enumerate(zip(uploaded_leaves(method, layout, round_index, len(leaves)),
                                                       jax.tree.leaves(start), leaves, kept)):
        if sent is False:
            out.append(after)
            left.append(owed)
            continue
        leaf_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(upload_keys)
        message = (after - begin).astype(jnp.float32) + (0.0 if owed is None else owed)
        decoded = jax.vmap(compression.roundtrip)(message, leaf_keys)
        arrived = (begin + decoded).astype(after.dtype)
        out.append(arrived if sent is True else jnp.where(sent, arrived, after))
        if owed is not None:
            left.append(message - decoded if sent is True else jnp.where(sent, message - decoded, owed))
    return jax.tree.unflatten(treedef, out), None if residuals is None else jax.tree.unflatten(treedef, left)


def residual_banks(params, num_clients: int):
    """Every client's zero residual: a tree like ``params`` with float32 leaves [U, ...]."""
    return jax.tree.map(lambda x: jnp.zeros((num_clients,) + x.shape, jnp.float32), params)


def write_residuals(banks, cohort: jax.Array, taking_part: jax.Array, new):
    """``banks`` [U, ...] with the cohort's slots [K] replaced by ``new`` [K, ...] where the slot
    took part (a scatter-add of the change, so a repeated id of an empty slot changes nothing)."""
    def write(bank, fresh):
        took = taking_part.reshape((-1,) + (1,) * (fresh.ndim - 1))
        return bank.at[cohort].add(jnp.where(took, fresh - bank[cohort], 0.0))

    return jax.tree.map(write, banks, new)


def upload_sizes(compression: Compression | None, layout: TrainableLayout, params, sizes: list[int],
                 base: int) -> tuple[LoraBytes, int]:
    """(LoRA bytes of one client's upload of every A / every B, the head's bytes) when everything
    uploaded travels through ``compression`` (``sizes``: each leaf's float bytes; ``base``: the
    adapted kernels' bytes, which never travel up)."""
    if compression is not None:
        sizes = [compression.message_bytes(x.shape) for x in jax.tree.leaves(params)]
    lora = LoraBytes(int(sum(sizes[m.a_index] for m in layout.modules)),
                     int(sum(sizes[m.b_index] for m in layout.modules)), base)
    return lora, int(sum(sizes[i] for i in layout.other_indices))


def communication_bytes(federation, params, frozen, round_index: int, sent: int, received: int) -> tuple[int, int]:
    """Exact (bytes_up, bytes_down) of one round of ``federation``: ``sent`` clients' uploads
    arrived and ``received`` clients got the model."""
    sizes, frozen_sizes = leaf_bytes(params), leaf_bytes(frozen)
    base = int(sum(frozen_sizes[j] for j in federation.folding.kernels))
    lora, head = upload_sizes(None, federation.layout, params, sizes, base)
    up_lora, up_head = upload_sizes(federation.compression, federation.layout, params, sizes, base)
    up = int(federation.method.upload_bytes(round_index, up_lora))
    down = int(federation.method.download_bytes(round_index, lora, received))
    return sent * (up + up_head), received * (down + head)
