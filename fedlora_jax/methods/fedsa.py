"""FedSA-LoRA: A is shared (uploaded and averaged), B stays with each client. The server keeps
every client's B in a bank [U, d_out, r] per module (its method state), so a client resumes from
its own B whenever it is sampled."""

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.methods.base import Aggregate, Method, register_method


class FedSA(Method):
    keeps_client_state = True

    def uploads(self, round_index):
        return (True, False)

    def downloads(self, round_index):
        return (True, False)

    def init_state(self, params, layout, num_clients):
        """Every client's B starts as the global B: one [U, d_out, r] bank per module."""
        leaves = jax.tree.leaves(params)
        return tuple(jnp.broadcast_to(leaves[m.b_index], (num_clients,) + m.b_shape) for m in layout.modules)

    def client_start(self, state, params, cohort, layout):
        start = super().client_start(state, params, cohort, layout)
        leaves, treedef = jax.tree.flatten(start)
        for m, bank in zip(layout.modules, state):
            leaves[m.b_index] = bank[cohort]
        return jax.tree.unflatten(treedef, leaves)

    def aggregate(self, b, a, w, round_index, key):
        _, a_bar = aggregation.fedsa(b, a, w)
        b_bar = aggregation.weighted_mean(b, w).astype(b.dtype)  # the "global" model reported for FedSA uses the mean B
        return Aggregate(b_bar, a_bar)

    def update_state(self, state, update):
        """Each cohort client's trained B goes into its slot of the bank."""
        trained, cohort = jax.tree.leaves(update.client_params), update.cohort
        took_part = update.taking_part.reshape((-1, 1, 1)) > 0
        banks = tuple(bank.at[cohort].set(jnp.where(took_part, trained[m.b_index], bank[cohort]))
                      for m, bank in zip(update.layout.modules, state))
        return update.after, banks


@register_method("fedsa")
def fedsa() -> Method:
    return FedSA()
