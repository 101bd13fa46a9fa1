"""FLoRA: the server stacks the clients' factors, merges the exact product into the base and
clients restart from B = 0 and a fresh A; clients download the stacked factors [d_out, K r] and
[K r, d_in]."""

import math

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FLoRA(Method):
    modifies_base = True

    def download_bytes(self, round_index, sizes, clients):
        return clients * (sizes.a + sizes.b)

    def aggregate(self, b, a, w, round_index, key):
        """The fresh A (HF PEFT init) is drawn from the server key, so it costs no download."""
        b_stacked, a_stacked = aggregation.flora_stack(b, a, w)
        rank, d_in = a.shape[1], a.shape[2]
        bound = 1.0 / math.sqrt(d_in)
        fresh_a = jax.random.uniform(key, (rank, d_in), jnp.float32, -bound, bound).astype(a.dtype)
        merged = b_stacked.astype(jnp.float32) @ a_stacked.astype(jnp.float32)
        return Aggregate(jnp.zeros_like(b[0]), fresh_a, merged)

    def divergence(self, b, a, w, out):
        """0: the exact stacked product moved into the base."""
        return jnp.zeros((), jnp.float32)


@register_method("flora")
def flora() -> Method:
    return FLoRA()
