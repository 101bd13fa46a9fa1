"""(placeholder until the server-optimiser branch lands)"""
import jax
import jax.numpy as jnp
import optax


def init_server_optimizer(tx, params):
    return tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), params))


def server_optimizer_step(tx, opt_state, before, after, trained=None):
    grads = jax.tree.map(lambda b, a: (b.astype(jnp.float32) - a.astype(jnp.float32)), before, after)
    updates, opt_state = tx.update(grads, opt_state, jax.tree.map(lambda x: x.astype(jnp.float32), before))
    if trained is not None:
        updates = jax.tree.map(lambda u, m: u * m, updates, trained)
    return jax.tree.map(lambda b, u: (b.astype(jnp.float32) + u).astype(b.dtype), before, updates), opt_state


def make_server_optimizer(name, learning_rate, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3):
    return {"sgd": lambda: optax.sgd(learning_rate, momentum or None), "adam": lambda: optax.adam(learning_rate, b1, b2, eps),
            "yogi": lambda: optax.yogi(learning_rate, b1, b2, eps)}[name]()
