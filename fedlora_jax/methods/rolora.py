"""RoLoRA: alternate the trained factor, B on even rounds and A on odd ones; only the trained
factor travels and is averaged, which is exact while the other stays shared."""

import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class RoLoRA(Method):
    mean_based = True
    streaming = True

    def trains(self, round_index):
        even = (jnp.asarray(round_index) % 2 == 0).astype(jnp.float32)
        return (1.0 - even, even)

    def uploads(self, round_index):
        return (round_index % 2 == 1, round_index % 2 == 0)

    downloads = uploads


    def summarise(self, b, a, w):
        return aggregation.weighted_mean(b, w), aggregation.weighted_mean(a, w)

    def finalise(self, summary, ideal, b_before, a_before, round_index, key):
        """The trained factor's mean; the idle one is the one every client had."""
        even = jnp.asarray(round_index) % 2 == 0
        return Aggregate(jnp.where(even, summary[0].astype(b_before.dtype), b_before),
                         jnp.where(even, a_before, summary[1].astype(a_before.dtype)))


@register_method("rolora")
def rolora() -> Method:
    return RoLoRA()
