"""Server optimisers (FedOpt): optax transforms applied to a round's pseudo-gradient.

Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2. The server treats the change a
round made, g = before - after (``after`` is the method's aggregate), as a gradient and steps
with an optimiser of its own:

| name | algorithm | state (float32, shaped like params)          | update                            |
|------|-----------|----------------------------------------------|-----------------------------------|
| sgd  | FedAvgM   | m = g + momentum m (none when momentum is 0) | -lr m                             |
| adam | FedAdam   | m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2   | -lr m / (sqrt(v) + eps)           |
| yogi | FedYogi   | m as adam, v = v - (1-b2) g^2 sign(v - g^2)  | -lr m / (sqrt(v) + eps)           |

``sgd`` with lr 1 and momentum 0 is plain averaging: the new params are ``after`` bit for bit.
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")
OPTION_PREFIX = "federation.server_optimizer"


class ScaleByFedOptState(NamedTuple):
    """Moments of FedAdam/FedYogi: ``mu`` (m) and ``nu`` (v), float32 trees shaped like params."""

    mu: optax.Updates
    nu: optax.Updates


def scale_by_fedopt(b1: float, b2: float, eps: float, second_moment: str) -> optax.GradientTransformation:
    """The paper's adaptive direction m / (sqrt(v) + eps), without the learning rate.

    Unlike ``optax.scale_by_adam`` and ``optax.scale_by_yogi`` there is no bias correction, and
    eps (the paper's tau) is added outside the square root, as in Algorithm 2. m starts at 0 and
    v at eps^2, the paper's lower bound v_{-1} >= tau^2, for both adam and yogi (optax's yogi
    starts m and v at 1e-6 and bias-corrects).

    Args:
      b1: decay of the first moment m, in [0, 1).
      b2: decay of the second moment v, in [0, 1).
      eps: tau > 0, the adaptivity floor added to sqrt(v).
      second_moment: "adam" (exponential average of g^2) or "yogi" (additive, sign-controlled).

    Returns:
      A transform whose state is :class:`ScaleByFedOptState` with leaves of the params' dtype
      (float32 when initialised by :func:`init_server_optimizer`).
    """

    def init(params):
        return ScaleByFedOptState(mu=jax.tree.map(jnp.zeros_like, params),
                                  nu=jax.tree.map(lambda p: jnp.full_like(p, eps * eps), params))

    def second(v, g):
        g2 = g * g
        if second_moment == "adam":
            return b2 * v + (1 - b2) * g2
        return v - (1 - b2) * g2 * jnp.sign(v - g2)

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(second, state.nu, updates)
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return direction, ScaleByFedOptState(mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _require(option: str, value: Any, ok, wanted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{OPTION_PREFIX}.{option} must be {wanted}, got {value!r}")


def make_server_optimizer(name: str, learning_rate: float, momentum: float = 0.9, b1: float = 0.9,
                          b2: float = 0.99, eps: float = 1e-3) -> optax.GradientTransformation:
    """The server optimiser called ``name``: sgd (FedAvgM), adam (FedAdam) or yogi (FedYogi).

    Args:
      name: "sgd", "adam" or "yogi".
      learning_rate: the server learning rate eta > 0.
      momentum: sgd only; the heavy-ball decay in [0, 1) (optax.sgd, not Nesterov). 0 keeps no
        state: the update is -lr g.
      b1, b2, eps: adam and yogi only; see :func:`scale_by_fedopt` (the paper's beta1, beta2, tau).

    Returns:
      An optax transform mapping the pseudo-gradient g = before - after to the server's update.

    Raises:
      ValueError: one line naming the bad option (``federation.server_optimizer.<option>``);
        every option is checked, also those the chosen optimiser does not use.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"{OPTION_PREFIX}.name must be sgd, adam or yogi, got {name!r}")
    _require("learning_rate", learning_rate, lambda x: x > 0, "a positive number")
    for option, value in (("momentum", momentum), ("b1", b1), ("b2", b2)):
        _require(option, value, lambda x: 0 <= x < 1, "a number in [0, 1)")
    _require("eps", eps, lambda x: x > 0, "a positive number")
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    return optax.chain(scale_by_fedopt(b1, b2, eps, name), optax.scale_by_learning_rate(learning_rate))


def init_server_optimizer(tx: optax.GradientTransformation, params) -> optax.OptState:
    """``tx.init`` on float32 copies of ``params``, so moments are float32 even for bf16 params."""
    return tx.init(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))


def _float32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _shaped_like(params_def, shapes, node) -> bool:
    leaves, node_def = jax.tree.flatten(node)
    return node_def == params_def and [jnp.shape(x) for x in leaves] == shapes


def server_optimizer_step(tx: optax.GradientTransformation, opt_state, before, after, trained=None):
    """One server step on the pseudo-gradient g = before - after.

    Computes in float32; the new params have ``before``'s dtypes. The result is before + u for
    the transform's update u, evaluated as after + (u + g) so that u = -g (sgd, lr 1, momentum 0)
    gives ``after`` bit for bit. Pure and jit-able (close over ``tx`` or mark it static).

    Args:
      tx: a transform from :func:`make_server_optimizer` (or any optax transform).
      opt_state: its state, from :func:`init_server_optimizer` or the previous step.
      before: the global params the round started from (a pytree).
      after: the round's aggregate, a pytree like ``before``.
      trained: None (every leaf trained) or a pytree like ``before`` of 0/1 multipliers (scalars
        or arrays broadcasting against each leaf): the factors the method trained this round.
        Updates are multiplied by it, and where it is 0 the params and every state subtree shaped
        like params (momentum, moments) keep their old values bit for bit, so an untrained factor
        neither moves nor has its momentum decay.

    Returns:
      (new_params, new_opt_state).
    """
    before32, after32 = _float32(before), _float32(after)
    pseudo_grad = jax.tree.map(jnp.subtract, before32, after32)
    updates, new_state = tx.update(pseudo_grad, opt_state, before32)
    if trained is None:
        trained = jax.tree.map(lambda _: 1.0, before)
    trained = _float32(trained)

    def new_leaf(p, a, u, g, m):
        return jnp.where(m != 0, a + (m * u + g), p)

    new_params = jax.tree.map(new_leaf, before32, after32, updates, pseudo_grad, trained)
    new_params = jax.tree.map(lambda n, p: n.astype(jnp.asarray(p).dtype), new_params, before)

    shapes = [jnp.shape(x) for x in jax.tree.leaves(before)]
    is_moment = functools.partial(_shaped_like, jax.tree.structure(before), shapes)

    def keep_untrained(new, old):
        if not is_moment(new):
            return new
        return jax.tree.map(lambda n, o, m: jnp.where(m != 0, n, o), new, old, trained)

    return new_params, jax.tree.map(keep_untrained, new_state, opt_state, is_leaf=is_moment)
