"""FedEx-LoRA: means of A and B, plus the residual mean(BA) - mean(B) mean(A) folded into the
frozen base, which makes the effective update exact; the updated base weights travel down."""

import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FedEx(Method):
    modifies_base = True
    streaming = True

    def download_bytes(self, round_index, sizes, clients):
        return sizes.a + sizes.b + sizes.base



    def summarise(self, b, a, w):
        return aggregation.weighted_mean(b, w), aggregation.weighted_mean(a, w)

    def finalise(self, summary, ideal, b_before, a_before, round_index, key):
        """The means, and the residual M - B_bar A_bar from the streamed ideal update M."""
        b_bar, a_bar = summary
        residual = ideal - b_bar.astype(jnp.float32) @ a_bar.astype(jnp.float32)
        return Aggregate(b_bar.astype(b_before.dtype), a_bar.astype(a_before.dtype), residual.astype(b_before.dtype))

    def streamed_divergence(self, ideal, out):
        return jnp.zeros((), jnp.float32)


@register_method("fedex")
def fedex() -> Method:
    return FedEx()
