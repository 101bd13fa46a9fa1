"""A federated LoRA method defined outside fedlora_jax: FFA-LoRA with a coordinate-wise trimmed
mean of the uploaded B (a robust aggregation, Yin et al. 2018, "Byzantine-Robust Distributed
Learning").

Use it from a config (with this directory on PYTHONPATH):

    federation:
      method: trimmed_mean:ffa_trimmed
      method_options: {trim: 0.1}

Clients train and upload B only; A stays frozen at its shared initialisation, so the new global
product B A is built from the uploads' products and A never moves. For every coordinate of every
B the server ranks the n clients that take part, drops the ``floor(trim * n)`` smallest and as
many largest values and averages the rest, unweighted: every client counts once, whatever its
example count (``trim = 0`` is the plain mean of the participants, not FFA-LoRA's mean weighted
by example counts). Slots with round weight 0 (empty slots of a cohort) are left out of the
ranks and of n. The head (trainable leaves that are not LoRA factors) keeps the engine's
weighted mean.

The trimmed mean is not a weighted mean of the uploads (``mean_based = False``: no user-level DP
and no server optimiser) nor a sum over chunks of clients (``streaming = False``: the server gets
the cohort's stacked B [K, d_out, r]).
"""

import jax.numpy as jnp

from fedlora_jax.methods import Method
from fedlora_jax.methods.base import Aggregate
from fedlora_jax.methods.ffa import FFA


def trimmed_mean(x, taking_part, trim: float):
    """The coordinate-wise trimmed mean (float32) of x [K, ...] over the slots where
    ``taking_part`` [K] (bool) holds: per coordinate, the floor(trim * n) smallest and as many
    largest of the n values taking part are dropped and the rest averaged. Shapes stay static:
    absent slots sort last as +inf, beyond the kept ranks. Zero when no slot takes part."""
    k = x.shape[0]
    expand = (k,) + (1,) * (x.ndim - 1)
    n = jnp.sum(taking_part.astype(jnp.int32))
    cut = jnp.asarray([int(trim * i) for i in range(k + 1)], jnp.int32)[n]  # floor(trim * n), exact on the host
    ranked = jnp.sort(jnp.where(taking_part.reshape(expand), x.astype(jnp.float32), jnp.inf), axis=0)
    rank = jnp.arange(k).reshape(expand)
    kept = (rank >= cut) & (rank < n - cut)
    return jnp.sum(jnp.where(kept, ranked, 0.0), axis=0) / jnp.maximum(n - 2 * cut, 1)


class FFATrimmed(FFA):
    """FFA-LoRA's protocol (A frozen; only B trained, uploaded and sent down) with a trimmed-mean
    server: only the aggregation is new."""

    mean_based = False
    streaming = False

    def __init__(self, trim: float):
        self.trim = trim

    def aggregate(self, b, a, w, round_index, key) -> Aggregate:
        b_new = trimmed_mean(b, w > 0, self.trim).astype(b.dtype)
        return Aggregate(b_new, a[0])  # A is frozen: every slot holds the global A


def ffa_trimmed(trim: float = 0.1) -> Method:
    """The factory a config names; its keyword arguments are the method's options."""
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= trim < 0.5:
        raise ValueError(f"method ffa_trimmed: option trim must be a number in [0, 0.5), got {trim!r}")
    return FFATrimmed(float(trim))
