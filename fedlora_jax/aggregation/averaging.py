"""Aggregations built from weighted factor means: FedIT, FFA-LoRA, FedEx-LoRA, FedSA-LoRA, RoLoRA.

All take stacked client factors B [U, d_out, r], A [U, r, d_in] and weights w [U] (>= 0, summing
to 1; checked in eager calls only, see :mod:`fedlora_jax.aggregation._checks`), compute in float32
(or wider) and return results in the inputs' dtype. The ideal update is M = sum_u w_u B_u @ A_u.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedlora_jax.aggregation import _checks, linalg


def weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum_u w_u x_u over the leading client axis, in the compute dtype; x [U, ...], w [U]."""
    dtype = _checks.compute_dtype(x, w)
    return jnp.tensordot(w.astype(dtype), x.astype(dtype), axes=1)


def fedit(B: jax.Array, A: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FedIT: weighted mean of each factor separately.

    Inexact in general: B_bar @ A_bar != M (the cross terms B_u A_v, u != v, leak in).

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights.

    Returns:
      B_bar [d_out, r] = sum_u w_u B_u and A_bar [r, d_in] = sum_u w_u A_u.
    """
    _checks.check_stacked(B, A, w)
    out = _checks.output_dtype(B, A)
    return weighted_mean(B, w).astype(out), weighted_mean(A, w).astype(out)


def ffa(B: jax.Array, A: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared init, B is averaged.

    Exact when all A_u are equal (the FFA invariant): B_bar @ A_0 = sum_u w_u B_u A_0 = M.

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors, identical across clients.
      w: [U] client weights.

    Returns:
      B_bar [d_out, r] = sum_u w_u B_u and A_0 [r, d_in] = A[0].
    """
    _checks.check_stacked(B, A, w)
    out = _checks.output_dtype(B, A)
    return weighted_mean(B, w).astype(out), jnp.asarray(A[0], out)


def fedex(B: jax.Array, A: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FedEx-LoRA: FedIT factors plus the exact residual, to be folded into the frozen weight.

    The server adds R (times the LoRA scale) to the frozen base weight, so that base + B_bar A_bar
    reproduces the ideal update exactly: B_bar @ A_bar + R = M. Cost O(d_out d_in U r); R is the
    only d_out x d_in array any aggregation here forms, because it is an output.

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights.

    Returns:
      B_bar [d_out, r], A_bar [r, d_in] (as :func:`fedit`) and R [d_out, d_in] = M - B_bar @ A_bar
      (paper orientation; transpose it for a Flax kernel [d_in, d_out]).
    """
    _checks.check_stacked(B, A, w)
    dtype = _checks.compute_dtype(B, A, w)
    out = _checks.output_dtype(B, A)
    B, A, w = B.astype(dtype), A.astype(dtype), w.astype(dtype)
    B_bar, A_bar = jnp.tensordot(w, B, axes=1), jnp.tensordot(w, A, axes=1)
    # R = [w_1 B_1 ... w_U B_U, -B_bar] @ [A_1; ...; A_U; A_bar] as a single matmul.
    B_s, A_s = linalg.stack_factors(B, A, w)
    left = jnp.concatenate([B_s, -B_bar], axis=1)
    right = jnp.concatenate([A_s, A_bar], axis=0)
    return B_bar.astype(out), A_bar.astype(out), (left @ right).astype(out)


def fedsa(B: jax.Array, A: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FedSA-LoRA: A is averaged and shared, each client keeps its own B.

    Client u's next update is B_u @ A_bar; there is no single global product.

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights.

    Returns:
      B_local [U, d_out, r] (the clients' own B, unchanged) and A_bar [r, d_in] = sum_u w_u A_u.
    """
    _checks.check_stacked(B, A, w)
    out = _checks.output_dtype(B, A)
    return jnp.asarray(B, out), weighted_mean(A, w).astype(out)


def rolora(
    B: jax.Array, A: jax.Array, w: jax.Array, round_index: int | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """RoLoRA: alternate which factor is trained, so that averaging it is exact.

    Even rounds: clients trained B with A frozen (A identical on all clients), so B is averaged
    and A = A[0]. Odd rounds: the reverse, A averaged and B = B[0]. Either way the product is
    exactly M given the invariant. ``round_index`` may be traced (``lax.cond``; under ``vmap``
    with a batched round index both branches run and are selected).

    Args:
      B: [U, d_out, r] client B factors (identical across clients in odd rounds).
      A: [U, r, d_in] client A factors (identical across clients in even rounds).
      w: [U] client weights.
      round_index: integer scalar, the round the factors were trained in.

    Returns:
      B_new [d_out, r] and A_new [r, d_in].
    """
    _checks.check_stacked(B, A, w)
    out = _checks.output_dtype(B, A)

    def average_b(_):
        return weighted_mean(B, w).astype(out), A[0].astype(out)

    def average_a(_):
        return B[0].astype(out), weighted_mean(A, w).astype(out)

    return lax.cond(jnp.asarray(round_index) % 2 == 0, average_b, average_a, None)
