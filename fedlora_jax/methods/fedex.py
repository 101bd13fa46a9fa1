"""FedEx-LoRA: means of A and B, plus the residual mean(BA) - mean(B) mean(A) folded into the
frozen base, which makes the effective update exact; the updated base weights travel down."""

import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FedEx(Method):
    modifies_base = True

    def download_bytes(self, round_index, sizes, clients):
        return sizes.a + sizes.b + sizes.base

    def aggregate(self, b, a, w, round_index, key):
        return Aggregate(*aggregation.fedex(b, a, w))

    def divergence(self, b, a, w, out):
        """0: the base update makes base + B_hat A_hat the exact mean."""
        return jnp.zeros((), jnp.float32)


@register_method("fedex")
def fedex() -> Method:
    return FedEx()
