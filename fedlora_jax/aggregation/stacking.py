"""FLoRA: exact aggregation by stacking the client factors (the global rank grows to sum_u r_u)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import _checks, linalg


def flora_stack(
    B: jax.Array | Sequence[jax.Array],
    A: jax.Array | Sequence[jax.Array],
    w: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """FLoRA stacking: B_s = [w_1 B_1 ... w_U B_U], A_s = [A_1; ...; A_U], so B_s @ A_s = M exactly.

    The output rank is the sum of the client ranks; the server typically folds B_s @ A_s into the
    frozen weight and re-initialises the adapters. Heterogeneous client ranks are supported by
    passing Python sequences of per-client factors.

    Args:
      B: stacked [U, d_out, r] client B factors, or a sequence of U arrays [d_out, r_u].
      A: stacked [U, r, d_in] client A factors, or a sequence of U arrays [r_u, d_in].
      w: [U] client weights.

    Returns:
      B_s [d_out, R] and A_s [R, d_in] with R = U r (stacked input) or sum_u r_u (sequences), in the
      inputs' dtype.
    """
    if isinstance(B, (list, tuple)) or isinstance(A, (list, tuple)):
        return _stack_heterogeneous(list(B), list(A), w)
    _checks.check_stacked(B, A, w)
    dtype = _checks.compute_dtype(B, A, w)
    out = _checks.output_dtype(B, A)
    B_s, A_s = linalg.stack_factors(B.astype(dtype), A.astype(dtype), w.astype(dtype))
    return B_s.astype(out), A_s.astype(out)


def _stack_heterogeneous(
    B_list: list[jax.Array], A_list: list[jax.Array], w: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """flora_stack for per-client factors B_u [d_out, r_u], A_u [r_u, d_in] of varying ranks."""
    if len(B_list) != len(A_list) or not B_list:
        raise ValueError(f"expected equally many (>= 1) B and A factors, got {len(B_list)} and {len(A_list)}")
    _checks.check_weights(w, len(B_list))
    d_out, d_in = B_list[0].shape[0], A_list[0].shape[-1]
    for index, (B_u, A_u) in enumerate(zip(B_list, A_list)):
        if jnp.ndim(B_u) != 2 or jnp.ndim(A_u) != 2:
            raise ValueError(
                f"client {index}: expected B [d_out, r] and A [r, d_in], got {B_u.shape}, {A_u.shape}"
            )
        if B_u.shape[0] != d_out or A_u.shape[1] != d_in or B_u.shape[1] != A_u.shape[0]:
            raise ValueError(
                f"client {index}: B {B_u.shape} and A {A_u.shape} do not match client 0's dimensions"
            )
    dtype = _checks.compute_dtype(*B_list, *A_list, w)
    out = _checks.output_dtype(*B_list, *A_list)
    weights = w.astype(dtype)
    B_s = jnp.concatenate([weights[u] * B_u.astype(dtype) for u, B_u in enumerate(B_list)], axis=1)
    A_s = jnp.concatenate(A_list, axis=0)
    return B_s.astype(out), A_s.astype(out)
