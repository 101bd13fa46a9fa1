"""Aggregation of federated LoRA factors: pure, jit- and vmap-able functions on stacked factors.

Conventions (paper notation): client factors are stacked along a leading client axis,
B [U, d_out, r] (the zero-initialised factor) and A [U, r, d_in], with client weights w [U]
(>= 0, summing to 1; their values are checked in eager calls only). The ideal aggregate is
M = sum_u w_u B_u @ A_u. Math runs in float32 (or wider); outputs come back in the inputs' dtype.
To aggregate many LoRA modules of one shape at once, ``jax.vmap`` over a leading module axis
(B [M, U, d_out, r]). See docs/aggregation.md for the math, costs and exactness of each method.
"""

from fedlora_jax.aggregation.averaging import fedex, fedit, fedsa, ffa, rolora, weighted_mean
from fedlora_jax.aggregation.flora_na import flora_na, flora_na_coefficients
from fedlora_jax.aggregation.fra import fra, fra_from_update, fra_then_ffa
from fedlora_jax.aggregation.linalg import dense_divergence, divergence, product_svd, stack_factors
from fedlora_jax.aggregation.stacking import flora_stack

__all__ = [
    "dense_divergence",
    "divergence",
    "fedex",
    "fedit",
    "fedsa",
    "ffa",
    "flora_na",
    "flora_na_coefficients",
    "flora_stack",
    "fra",
    "fra_from_update",
    "fra_then_ffa",
    "product_svd",
    "rolora",
    "stack_factors",
    "weighted_mean",
]
