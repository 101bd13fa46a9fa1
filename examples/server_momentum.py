"""A federated LoRA method defined outside fedlora_jax: FFA-LoRA with server momentum (FedAvgM,
Hsu et al. 2019, on the uploaded B and the head).

Use it from a config (with this directory on PYTHONPATH):

    federation:
      method: server_momentum:ffa_momentum
      method_options: {beta: 0.9, server_lr: 1.0}

The server keeps a velocity v (one array per trainable leaf: its method state, checkpointed with
the run). Each round, with d = mean of the uploads - the global state the cohort started from:
v <- beta v + d and the new global state is the old one + server_lr v. A stays frozen, so the
product update stays exact (the momentum is linear in B).
"""

import jax
import jax.numpy as jnp

from fedlora_jax.methods import Method
from fedlora_jax.methods.ffa import FFA


class FFAMomentum(FFA):
    """FFA-LoRA's protocol (A frozen, B uploaded and averaged, a streamed mean) plus a server
    velocity: only the server state and its update are new."""

    def __init__(self, beta: float, server_lr: float):
        self.beta, self.server_lr = beta, server_lr

    def init_state(self, params, layout, num_clients):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)  # the velocity

    def update_state(self, velocity, update):
        delta = jax.tree.map(lambda new, old: new.astype(jnp.float32) - old, update.after, update.before)
        velocity = jax.tree.map(lambda v, d: self.beta * v + d, velocity, delta)
        params = jax.tree.map(lambda old, v: (old + self.server_lr * v).astype(old.dtype), update.before, velocity)
        return params, velocity


def ffa_momentum(beta: float = 0.9, server_lr: float = 1.0) -> Method:
    """The factory a config names; its keyword arguments are the method's options."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"method ffa_momentum: option beta must be in [0, 1), got {beta!r}")
    return FFAMomentum(float(beta), float(server_lr))
