"""Federated LoRA methods as the engine sees them: what clients train, what travels, how the
server aggregates.

The math lives in :mod:`fedlora_jax.aggregation` as pure functions on stacked factors
(B [U, d_out, r], A [U, r, d_in], w [U]); a :class:`Method` wraps one of them with the protocol
facts the engine needs for training masks and exact byte counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation


class Aggregate(NamedTuple):
    """Server output for one LoRA module.

    b: new global B [d_out, r]; a: new global A [r, d_in];
    base_delta: a change to fold into the frozen weight in math orientation [d_out, d_in]
    (already including nothing of the LoRA scaling; the engine multiplies by it), or None.
    """

    b: jax.Array
    a: jax.Array
    base_delta: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A federated LoRA method.

    Attributes:
      name: registry name.
      aggregate_fn: (B [U, d_out, r], A [U, r, d_in], w [U], round_index) -> Aggregate.
      trains: round_index -> (train_a, train_b) as 0/1 scalars (may be traced).
      uploads: round_index (host int) -> (A uploaded, B uploaded).
      downloads: round_index (host int) -> (A sent down, B sent down).
      modifies_base: the server folds ``base_delta`` into frozen weights, which are then sent
        down for the adapted modules (counted in bytes_down).
    """

    name: str
    aggregate_fn: Callable[..., Aggregate]
    trains: Callable[[Any], tuple] = lambda r: (1.0, 1.0)
    uploads: Callable[[int], tuple[bool, bool]] = lambda r: (True, True)
    downloads: Callable[[int], tuple[bool, bool]] = lambda r: (True, True)
    modifies_base: bool = False


def _fedit(b, a, w, round_index):
    b_bar, a_bar = aggregation.fedit(b, a, w)
    return Aggregate(b_bar, a_bar)


def make_method(name: str, options: dict | None = None, lora_rank: int = 8) -> Method:
    """Builds a method by registry name with its options from the config."""
    options = dict(options or {})
    builders = {"fedit": lambda: Method("fedit", _fedit)}
    if name not in builders:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(builders)}")
    method = builders[name]()
    if options:
        raise ValueError(f"method {name!r} takes no options, got {sorted(options)}")
    return method


def weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum_u w_u x_u over the leading axis; x [U, ...], w [U]."""
    return jnp.tensordot(w.astype(jnp.float32), x.astype(jnp.float32), axes=1).astype(x.dtype)
