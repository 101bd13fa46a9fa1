"""What the server receives from the cohort: the uploaded leaves of each client's trained state,
through the run's upload compression (:mod:`fedlora_jax.aggregation.compression`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation.compression import Compression
from fedlora_jax.methods import LoraBytes, Method
from fedlora_jax.params import TrainableLayout

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
             round_index, keys):
    """The cohort's states as the server decodes them: leaves [K, ...].

    Each uploaded leaf (:func:`uploaded_leaves`) arrives as start + the decoded message of its
    update (trained - start), compressed independently per client and leaf; a leaf the client
    keeps (e.g. FedSA's B, FFA's frozen A) stays as trained. Without compression: ``trained``.

    Args:
      compression: the scheme, or None.
      method, layout: what is uploaded and where the factors are.
      start: the states the clients started from, leaves [K, ...] (what the server sent).
      trained: the clients' trained states, leaves [K, ...].
      round_index: the round (may be traced).
      keys: [K] the clients' training keys (their upload randomness is folded from them).
    """
    if compression is None:
        return trained
    upload_keys = jax.vmap(lambda k: jax.random.fold_in(k, _UPLOAD_STREAM))(keys)
    leaves, treedef = jax.tree.flatten(trained)
    out = []
    for i, (sent, begin, after) in enumerate(zip(uploaded_leaves(method, layout, round_index, len(leaves)),
                                                 jax.tree.leaves(start), leaves)):
        if sent is False:
            out.append(after)
            continue
        leaf_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(upload_keys)
        update = (after - begin).astype(jnp.float32)
        decoded = (begin + jax.vmap(compression.roundtrip)(update, leaf_keys)).astype(after.dtype)
        out.append(decoded if sent is True else jnp.where(sent, decoded, after))
    return jax.tree.unflatten(treedef, out)


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
