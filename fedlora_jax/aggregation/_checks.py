"""Input checks and dtype handling shared by the aggregation functions.

Shape checks are static (they read ``.shape`` only) and therefore run under ``jax.jit`` and
``jax.vmap`` too. Value checks on the client weights (non-negative, summing to one) need concrete
values, so they run only when the weights are concrete (an eager call); inside a traced call the
caller is responsible for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Client weights must sum to one within this absolute tolerance (float32 sums of U fractions).
WEIGHT_SUM_ATOL = 1e-4


def compute_dtype(*arrays) -> jnp.dtype:
    """The dtype the math runs in: the inputs' common dtype, at least float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def output_dtype(*arrays) -> jnp.dtype:
    """The dtype results are cast back to: the inputs' common floating dtype."""
    dtype = jnp.result_type(*arrays)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def check_stacked(B, A, w) -> tuple[int, int, int, int]:
    """Checks stacked client factors and weights; returns (U, d_out, r, d_in).

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights (>= 0, summing to 1).

    Raises:
      ValueError: on a shape mismatch, or on invalid weight values when ``w`` is concrete.
    """
    if jnp.ndim(B) != 3 or jnp.ndim(A) != 3:
        raise ValueError(
            f"expected B [U, d_out, r] and A [U, r, d_in], got shapes {jnp.shape(B)} and {jnp.shape(A)}"
        )
    num_clients, d_out, rank = B.shape
    if A.shape[0] != num_clients or A.shape[1] != rank:
        raise ValueError(f"B {B.shape} and A {A.shape} disagree on clients U or rank r")
    check_weights(w, num_clients)
    return num_clients, d_out, rank, A.shape[2]


def check_weights(w, num_clients: int) -> None:
    """Checks client weights w [U]: shape always, values (>= 0, sum 1) when concrete."""
    if jnp.shape(w) != (num_clients,):
        raise ValueError(f"expected client weights of shape ({num_clients},), got {jnp.shape(w)}")
    try:
        values = np.asarray(w, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: values are unknown here; see the module docstring
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"client weights must be finite and >= 0, got {values}")
    if abs(values.sum() - 1.0) > WEIGHT_SUM_ATOL:
        raise ValueError(f"client weights must sum to 1, got sum {values.sum():.6g}")


def check_product(B_hat, A_hat, d_out: int, d_in: int) -> None:
    """Checks an aggregate B_hat [d_out, k], A_hat [k, d_in] against the clients' shapes."""
    if jnp.ndim(B_hat) != 2 or jnp.ndim(A_hat) != 2:
        raise ValueError(
            f"expected B_hat [d_out, k] and A_hat [k, d_in], got {jnp.shape(B_hat)} and {jnp.shape(A_hat)}"
        )
    if B_hat.shape[0] != d_out or A_hat.shape[1] != d_in or B_hat.shape[1] != A_hat.shape[0]:
        raise ValueError(
            f"B_hat {B_hat.shape} @ A_hat {A_hat.shape} does not give a [{d_out}, {d_in}] update"
        )
