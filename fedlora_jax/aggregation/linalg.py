"""Low-rank linear algebra on stacked LoRA factors, without forming d_out x d_in matrices.

The ideal aggregate of U clients is ``M = sum_u w_u B_u @ A_u``. It factors exactly through the
stacked factors ``M = B_s @ A_s`` with ``B_s = [w_1 B_1 ... w_U B_U]`` ([d_out, U r]) and
``A_s = [A_1; ...; A_U]`` ([U r, d_in]), so everything about ``M`` (its norm, its distance to a
candidate ``B_hat @ A_hat``, its truncated SVD) can be computed from [d, U r] factors and
(U r) x (U r) cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import _checks


def stack_factors(B: jax.Array, A: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact factorisation of the ideal update: M = B_s @ A_s.

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights.

    Returns:
      B_s [d_out, U r] = [w_1 B_1 ... w_U B_U] and A_s [U r, d_in] = [A_1; ...; A_U], in the dtype
      of the inputs (no upcast).
    """
    num_clients, d_out, rank = B.shape
    weighted = B * w.astype(B.dtype)[:, None, None]
    B_s = jnp.transpose(weighted, (1, 0, 2)).reshape(d_out, num_clients * rank)
    A_s = A.reshape(num_clients * rank, A.shape[2])
    return B_s, A_s


@functools.partial(jax.jit, static_argnames="rank")
def product_svd(left: jax.Array, right: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Truncated SVD of ``left @ right`` without forming the product.

    QR-factorises both factors (``left = Q_l R_l``, ``right^T = Q_r R_r``), takes the SVD of the
    small core ``R_l @ R_r^T`` and rotates back. Cost O((d_out + d_in) k^2 + k^3) for inner
    dimension k, instead of O(d_out d_in min(d_out, d_in)) for a dense SVD.

    Args:
      left: [d_out, k].
      right: [k, d_in].
      rank: number of singular triplets to return (static). If it exceeds the number the product
        can have (min(d_out, d_in, k)), the result is padded with zeros so shapes stay static.

    Returns:
      U [d_out, rank] with orthonormal columns (zero columns where padded), S [rank] singular values
      in descending order (zeros where padded), Vt [rank, d_in] with orthonormal rows (zero rows
      where padded), so that ``U @ diag(S) @ Vt`` is the best rank-``rank`` approximation.
    """
    q_left, r_left = jnp.linalg.qr(left, mode="reduced")
    q_right, r_right = jnp.linalg.qr(right.T, mode="reduced")
    core_u, core_s, core_vt = jnp.linalg.svd(r_left @ r_right.T, full_matrices=False)
    kept = min(rank, core_s.shape[0])
    u, vt = canonical_signs(q_left @ core_u[:, :kept], core_vt[:kept] @ q_right.T)
    return _padded(u, core_s[:kept], vt, rank)


def dense_svd(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Truncated SVD of a dense matrix m [d_out, d_in] (e.g. the streamed ideal update):
    (U [d_out, rank], S [rank], Vt [rank, d_in]) as :func:`product_svd` returns them, with the
    same sign convention, so both give the same factors of the same product."""
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    kept = min(rank, s.shape[0])
    u, vt = canonical_signs(u[:, :kept], vt[:kept])
    return _padded(u, s[:kept], vt, rank)


def canonical_signs(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular pairs (u [d_out, k] columns, vt [k, d_in] rows) with each column's entry of
    largest magnitude made positive: an SVD is unique only up to the sign of each pair, and
    this choice makes two routes to the same product agree."""
    largest = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None], axis=0)[0]
    sign = jnp.where(largest < 0, -1.0, 1.0).astype(u.dtype)
    return u * sign, vt * sign[:, None]


def _padded(u, s, vt, rank: int):
    """Zero singular triplets appended up to ``rank`` (static shapes when rank > attainable)."""
    padding = rank - s.shape[0]
    if padding:
        u = jnp.pad(u, ((0, 0), (0, padding)))
        vt = jnp.pad(vt, ((0, padding), (0, 0)))
        s = jnp.pad(s, (0, padding))
    return u, s, vt


def divergence(
    B: jax.Array, A: jax.Array, w: jax.Array, B_hat: jax.Array, A_hat: jax.Array
) -> jax.Array:
    """Relative aggregation error ||B_hat A_hat - M||_F / ||M||_F, without forming M.

    With the stacked factors B_s [d_out, U r], A_s [U r, d_in] (see :func:`stack_factors`),
    M - B_hat A_hat = P Q with P = [B_s, -B_hat] [d_out, n] and Q = [A_s; A_hat] [n, d_in],
    n = U r + k. With reduced QRs P = Q_p R_p and Q^T = Q_q R_q (orthonormal columns), the norms
    are those of small n x n products: ||M - B_hat A_hat|| = ||R_p R_q^T|| and, from the first
    U r columns, ||M|| = ||R_p[:, :Ur] R_q[:, :Ur]^T||. Cost O((d_out + d_in) n^2), no d_out x d_in
    matrix. Unlike a difference of Gram traces, nothing cancels: an exact aggregate reads at
    float32 rounding level (~1e-6), not at sqrt(eps) ~ 3e-4.

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights (>= 0, summing to 1; values checked only in eager calls).
      B_hat: [d_out, k] aggregated B (any k).
      A_hat: [k, d_in] aggregated A.

    Returns:
      Scalar float32 (or wider) relative error. When M = 0 it is 0 if B_hat A_hat = 0 too and
      +inf otherwise.
    """
    _, d_out, _, d_in = _checks.check_stacked(B, A, w)
    _checks.check_product(B_hat, A_hat, d_out, d_in)
    return _divergence(B, A, w, B_hat, A_hat)


@jax.jit
def _divergence(B: jax.Array, A: jax.Array, w: jax.Array, B_hat: jax.Array, A_hat: jax.Array) -> jax.Array:
    """:func:`divergence` on validated inputs, compiled once per shape for eager callers."""
    dtype = _checks.compute_dtype(B, A, w, B_hat, A_hat)
    B_s, A_s = stack_factors(B.astype(dtype), A.astype(dtype), w.astype(dtype))
    B_hat, A_hat = B_hat.astype(dtype), A_hat.astype(dtype)
    n_ideal = B_s.shape[1]
    r_p = jnp.linalg.qr(jnp.concatenate([B_s, -B_hat], axis=1), mode="r")
    r_q = jnp.linalg.qr(jnp.concatenate([A_s, A_hat], axis=0).T, mode="r")
    error_sq = jnp.sum(jnp.square(r_p @ r_q.T))
    ideal_sq = jnp.sum(jnp.square(r_p[:, :n_ideal] @ r_q[:, :n_ideal].T))
    candidate_sq = jnp.sum(jnp.square(B_hat)) * jnp.sum(jnp.square(A_hat))  # zero iff a factor is zero
    tiny = jnp.finfo(dtype).tiny
    ideal_is_zero = ideal_sq <= tiny
    ratio = jnp.sqrt(error_sq / jnp.where(ideal_is_zero, 1.0, ideal_sq))
    at_zero = jnp.where(candidate_sq <= tiny, 0.0, jnp.inf).astype(dtype)
    return jnp.where(ideal_is_zero, at_zero, ratio)


def dense_divergence(ideal: jax.Array, B_hat: jax.Array, A_hat: jax.Array) -> jax.Array:
    """:func:`divergence` from a dense ideal update M [d_out, d_in] (as a streamed round sums it
    chunk by chunk): ||B_hat A_hat - M||_F / ||M||_F, with the same convention at M = 0."""
    dtype = _checks.compute_dtype(ideal, B_hat, A_hat)
    ideal = ideal.astype(dtype)
    candidate = B_hat.astype(dtype) @ A_hat.astype(dtype)
    error_sq, ideal_sq = jnp.sum(jnp.square(candidate - ideal)), jnp.sum(jnp.square(ideal))
    tiny = jnp.finfo(dtype).tiny
    ideal_is_zero = ideal_sq <= tiny
    at_zero = jnp.where(jnp.sum(jnp.square(candidate)) <= tiny, 0.0, jnp.inf).astype(dtype)
    return jnp.where(ideal_is_zero, at_zero, jnp.sqrt(error_sq / jnp.where(ideal_is_zero, 1.0, ideal_sq)))
