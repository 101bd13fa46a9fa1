"""FLoRA-NA (Nguyen et al., 2025): the best rank-r aggregate within the span of the client factors.

B_hat = sum_u p_u B_u and A_hat = sum_u q_u A_u with coefficients p, q in R^U chosen to minimise
f(p, q) = ||B_hat A_hat - M||_F^2, M = sum_u w_u B_u A_u. f is quadratic in p for fixed q and in q
for fixed p, so it is minimised by alternating exact U x U least-squares solves, starting from
p = q = w (which is FedIT). Every quantity needs only the r x r Gram blocks

    G_B[u, v] = B_u^T B_v,    G_A[u, v] = A_u A_v^T        ([U, U, r, r] each),

never a d_out x d_in matrix: cost O((d_out + d_in) U^2 r^2) for the Grams, then O(U^2 r^2 + U^3)
per iteration.

Bounds (the objective never increases: each half-step is an exact minimisation and a step that
does not lower the objective is rejected): FedIT error >= FLoRA-NA error >= FRA's rank-r error,
the latter because B_hat A_hat has rank <= r and the truncated SVD is optimal (Eckart-Young).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedlora_jax.aggregation import _checks


def _gram_blocks(B: jax.Array, A: jax.Array) -> tuple[jax.Array, jax.Array]:
    """G_B [U, U, r, r] with G_B[u, v] = B_u^T B_v and G_A [U, U, r, r] with G_A[u, v] = A_u A_v^T."""
    return jnp.einsum("uor,vos->uvrs", B, B), jnp.einsum("uri,vsi->uvrs", A, A)


def _normal_equations(
    gram_own: jax.Array, gram_other: jax.Array, coeffs_other: jax.Array, w: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Normal equations H c = g for one factor's coefficients, the other factor's held fixed.

    For the p-step (own = B, other = A, coeffs_other = q, A_hat = sum_v q_v A_v):
    H[u, u'] = tr(G_B[u, u'] A_hat A_hat^T) and g[u] = sum_v w_v tr(G_B[u, v] A_v A_hat^T).
    The q-step is the same with the roles of A and B swapped (by the symmetry of the traces).

    Returns:
      H [U, U] (symmetric PSD) and g [U].
    """
    other_gram = jnp.einsum("u,v,uvij->ij", coeffs_other, coeffs_other, gram_other)  # A_hat A_hat^T
    other_cross = jnp.einsum("vuij,u->vij", gram_other, coeffs_other)  # [v] = A_v A_hat^T
    hessian = jnp.einsum("uvij,ji->uv", gram_own, other_gram)
    rhs = jnp.einsum("uvij,vji,v->u", gram_own, other_cross, w)
    return hessian, rhs


def _regularised_solve(hessian: jax.Array, rhs: jax.Array, ridge: jax.Array) -> jax.Array:
    """Solves (H + lambda I) c = g, lambda = ridge * tr(H) / U, by a truncated eigendecomposition.

    Eigenvalues below U * eps * the largest are treated as zero (pseudo-inverse), so rank-deficient
    systems (e.g. identical clients) give the minimum-norm solution instead of overflow.
    """
    num_clients = hessian.shape[0]
    eps = jnp.finfo(hessian.dtype).eps
    shift = ridge * jnp.trace(hessian) / num_clients
    evals, evecs = jnp.linalg.eigh(hessian + shift * jnp.eye(num_clients, dtype=hessian.dtype))
    cutoff = num_clients * eps * jnp.maximum(evals[-1], jnp.finfo(hessian.dtype).tiny)
    inverse = jnp.where(evals > cutoff, 1.0 / jnp.where(evals > cutoff, evals, 1.0), 0.0)
    return evecs @ (inverse * (evecs.T @ rhs))


def flora_na_coefficients(
    B: jax.Array,
    A: jax.Array,
    w: jax.Array,
    tol: float = 1e-6,
    max_iter: int = 50,
    ridge: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """FLoRA-NA mixing coefficients p, q [U] (see the module docstring for the method).

    Alternates exact solves for p (q fixed) and q (p fixed) inside ``lax.while_loop`` from
    p = q = w, keeping a step only if it lowers the objective, and stops when the relative
    improvement of one p-then-q sweep is below ``tol`` or after ``max_iter`` sweeps. It starts
    stopped when the FedIT error is already at float precision (e.g. U = 1 or M = 0).

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights (>= 0, summing to 1).
      tol: relative-improvement threshold per sweep.
      max_iter: maximum number of sweeps (may be traced).
      ridge: relative Tikhonov shift of each U x U system, scaled by tr(H) / U.

    Returns:
      p [U] and q [U] in float32 (or wider), with B_hat = sum_u p_u B_u, A_hat = sum_u q_u A_u.
    """
    _checks.check_stacked(B, A, w)
    dtype = _checks.compute_dtype(B, A, w)
    return _alternating_least_squares(
        B.astype(dtype), A.astype(dtype), w.astype(dtype), tol, max_iter, jnp.asarray(ridge, dtype)
    )


@jax.jit
def _alternating_least_squares(
    B: jax.Array, A: jax.Array, w: jax.Array, tol: float, max_iter: int, ridge: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The FLoRA-NA loop of :func:`flora_na_coefficients` on validated, upcast inputs.

    Jitted on its own (inlined under an outer jit) so that eager calls compile the loop once per
    shape instead of re-tracing it with the Gram blocks baked in as constants.
    """
    dtype = B.dtype
    gram_b, gram_a = _gram_blocks(B, A)
    ideal_sq = jnp.einsum("u,v,uvij,uvij->", w, w, gram_b, gram_a)  # ||M||_F^2

    def objective_after_q_step(hessian_q, rhs_q, q):
        return ideal_sq - 2.0 * q @ rhs_q + q @ hessian_q @ q

    initial = objective_after_q_step(*_normal_equations(gram_a, gram_b, w, w), w)
    tiny = jnp.finfo(dtype).tiny

    def keep_going(state):
        iteration, _, _, _, done = state
        return jnp.logical_and(~done, iteration < max_iter)

    def sweep(state):
        iteration, p, q, objective, _ = state
        p_new = _regularised_solve(*_normal_equations(gram_b, gram_a, q, w), ridge)
        hessian_q, rhs_q = _normal_equations(gram_a, gram_b, p_new, w)
        q_new = _regularised_solve(hessian_q, rhs_q, ridge)
        objective_new = objective_after_q_step(hessian_q, rhs_q, q_new)
        improved = objective_new < objective
        relative_gain = (objective - objective_new) / jnp.maximum(objective, tiny)
        return (
            iteration + 1,
            jnp.where(improved, p_new, p),
            jnp.where(improved, q_new, q),
            jnp.where(improved, objective_new, objective),
            relative_gain < tol,
        )

    at_precision = initial <= jnp.finfo(dtype).eps * ideal_sq
    state = (jnp.asarray(0), w, w, initial, at_precision)
    _, p, q, _, _ = lax.while_loop(keep_going, sweep, state)
    return p, q


def flora_na(
    B: jax.Array,
    A: jax.Array,
    w: jax.Array,
    tol: float = 1e-6,
    max_iter: int = 50,
    ridge: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """FLoRA-NA: B_hat = sum_u p_u B_u, A_hat = sum_u q_u A_u minimising ||B_hat A_hat - M||_F.

    Its error is <= FedIT's (p = q = w is FedIT and no accepted step raises the objective) and
    >= the rank-r truncated SVD error of :func:`~fedlora_jax.aggregation.fra.fra` with rank r
    (B_hat A_hat has rank <= r; Eckart-Young). The mixing coefficients are available from
    :func:`flora_na_coefficients`.

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights.
      tol: relative-improvement threshold per alternating sweep.
      max_iter: maximum number of sweeps.
      ridge: relative Tikhonov shift of each U x U solve.

    Returns:
      B_hat [d_out, r] and A_hat [r, d_in] in the inputs' dtype.
    """
    p, q = flora_na_coefficients(B, A, w, tol=tol, max_iter=max_iter, ridge=ridge)
    dtype, out = p.dtype, _checks.output_dtype(B, A)
    B_hat = jnp.tensordot(p, B.astype(dtype), axes=1)
    A_hat = jnp.tensordot(q, A.astype(dtype), axes=1)
    return B_hat.astype(out), A_hat.astype(out)
