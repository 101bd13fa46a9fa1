"""RoLoRA: alternate the trained factor, B on even rounds and A on odd ones; only the trained
factor travels and is averaged, which is exact while the other stays shared."""

import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class RoLoRA(Method):
    mean_based = True

    def trains(self, round_index):
        even = (jnp.asarray(round_index) % 2 == 0).astype(jnp.float32)
        return (1.0 - even, even)

    def uploads(self, round_index):
        return (round_index % 2 == 1, round_index % 2 == 0)

    downloads = uploads

    def aggregate(self, b, a, w, round_index, key):
        return Aggregate(*aggregation.rolora(b, a, w, round_index))


@register_method("rolora")
def rolora() -> Method:
    return RoLoRA()
