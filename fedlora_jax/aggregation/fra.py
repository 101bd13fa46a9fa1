"""FRA-LoRA (Trautmann et al., 2024): best rank-k re-factorisation of the ideal update, and its
hybrid schedule with FFA-LoRA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fedlora_jax.aggregation import _checks, averaging, linalg

SPLITS = ("balanced", "left")


def fra(
    B: jax.Array, A: jax.Array, w: jax.Array, rank: int, split: str = "balanced"
) -> tuple[jax.Array, jax.Array]:
    """FRA-LoRA: truncated SVD of M = sum_u w_u B_u A_u, computed without forming M.

    M = B_s @ A_s with B_s [d_out, U r], A_s [U r, d_in] (see
    :func:`~fedlora_jax.aggregation.linalg.stack_factors`), so rank(M) <= U r. Both stacked
    factors are QR-factorised, the (U r) x (U r) core R_b R_a^T is SVD'd and rotated back
    (:func:`~fedlora_jax.aggregation.linalg.product_svd`). The result is the best rank-``rank``
    approximation in Frobenius norm (Eckart-Young), exact when ``rank >= U r``; if ``rank``
    exceeds the attainable rank the factors are zero-padded. Cost O((d_out + d_in)(U r)^2 +
    (U r)^3) versus O(d_out d_in (U r + min(d_out, d_in))) for forming M and a dense SVD.

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors.
      w: [U] client weights.
      rank: output rank (static under jit).
      split: how the singular values are shared between the factors (static): ``"balanced"``
        gives B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T; ``"left"`` gives B = U_k S_k, A = V_k^T
        (A with orthonormal rows, the natural frozen A for FFA-LoRA afterwards).

    Returns:
      B_new [d_out, rank] and A_new [rank, d_in].
    """
    _checks.check_stacked(B, A, w)
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"fra rank must be a positive integer, got {rank!r}")
    if split not in SPLITS:
        raise ValueError(f"fra split must be one of {SPLITS}, got {split!r}")
    return _fra(B, A, w, rank, split)


@functools.partial(jax.jit, static_argnames=("rank", "split"))
def _fra(B: jax.Array, A: jax.Array, w: jax.Array, rank: int, split: str) -> tuple[jax.Array, jax.Array]:
    """:func:`fra` on validated inputs, compiled once per shape for eager callers."""
    dtype = _checks.compute_dtype(B, A, w)
    out = _checks.output_dtype(B, A)
    B_s, A_s = linalg.stack_factors(B.astype(dtype), A.astype(dtype), w.astype(dtype))
    B_new, A_new = _split(*linalg.product_svd(B_s, A_s, rank), split)
    return B_new.astype(out), A_new.astype(out)


def fra_from_update(M: jax.Array, rank: int, split: str = "balanced") -> tuple[jax.Array, jax.Array]:
    """:func:`fra` from the dense ideal update M [d_out, d_in] (streamed rounds sum it chunk by
    chunk): a dense truncated SVD, O(d_out d_in min(d_out, d_in)). Same factors as :func:`fra`
    (same sign convention) up to float rounding, where the singular values are distinct.

    Returns:
      B_new [d_out, rank] and A_new [rank, d_in] (float32 or wider).
    """
    if split not in SPLITS:
        raise ValueError(f"fra split must be one of {SPLITS}, got {split!r}")
    return _split(*linalg.dense_svd(M, rank), split)


def _split(u, s, vt, split: str):
    """(B, A) from a truncated SVD: sqrt(S) on each side (balanced), or S on B (left)."""
    if split == "balanced":
        root = jnp.sqrt(s)
        return u * root, root[:, None] * vt
    return u * s, vt


def fra_then_ffa(
    B: jax.Array,
    A: jax.Array,
    w: jax.Array,
    round_index: int | jax.Array,
    switch_round: int | jax.Array,
    rank: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """FRA-LoRA's hybrid schedule: FRA for the first ``switch_round`` rounds, then FFA-LoRA.

    Rounds ``0 .. switch_round - 2`` use :func:`fra` with the balanced split; the last FRA round
    (``switch_round - 1``) uses the left split, so the A it broadcasts has orthonormal rows; from
    round ``switch_round`` on, clients keep that A frozen and the server runs :func:`ffa` (B
    averaged, A = A[0]). ``round_index`` and ``switch_round`` may be traced; ``lax.switch`` runs
    only the selected branch (unless the index is batched under ``vmap``).

    Args:
      B: [U, d_out, r] client B factors.
      A: [U, r, d_in] client A factors (identical across clients from round ``switch_round`` on).
      w: [U] client weights.
      round_index: integer scalar, the round the factors were trained in.
      switch_round: integer scalar T, the first FFA round.
      rank: output rank; must equal the client rank r (the default), since the same adapters
        continue in the next round and both branches must have one static shape.

    Returns:
      B_new [d_out, r] and A_new [r, d_in].
    """
    _, _, client_rank, _ = _checks.check_stacked(B, A, w)
    if rank is not None and rank != client_rank:
        raise ValueError(f"fra_then_ffa rank must equal the client rank {client_rank}, got {rank!r}")
    branches = (
        lambda: fra(B, A, w, client_rank, "balanced"),
        lambda: fra(B, A, w, client_rank, "left"),
        lambda: averaging.ffa(B, A, w),
    )
    return lax.switch(hybrid_phase(round_index, switch_round), branches)


def hybrid_phase(round_index: int | jax.Array, switch_round: int | jax.Array) -> jax.Array:
    """The FRA-then-FFA phase of a round: 0 FRA balanced (rounds < T - 1), 1 FRA left (the last
    FRA round, T - 1), 2 FFA (rounds >= T); may be traced."""
    round_index, switch_round = jnp.asarray(round_index), jnp.asarray(switch_round)
    return jnp.where(round_index < switch_round - 1, 0, jnp.where(round_index == switch_round - 1, 1, 2))
