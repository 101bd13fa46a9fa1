"""Federated LoRA methods as the engine sees them: what clients train, what travels, how the
server aggregates.

The math lives in :mod:`fedlora_jax.aggregation` as pure functions on stacked factors
(B [U, d_out, r], A [U, r, d_in], w [U]); a :class:`Method` wraps one of them with the protocol
facts the engine needs for training masks and exact byte counts.

| method       | clients train      | upload   | server                                   | download          |
|--------------|--------------------|----------|------------------------------------------|-------------------|
| fedit        | A, B               | A, B     | means of A and of B                      | A, B              |
| ffa          | B (A frozen)       | B        | mean of B                                | B                 |
| fra          | A, B               | A, B     | rank-r truncated SVD of mean(B A)        | A, B              |
| fra_then_ffa | A, B, then B       | as used  | fra for ``switch_round`` rounds, then ffa | as used           |
| flora_na     | A, B               | A, B     | coefficient fit (sum p B)(sum q A) ~ M   | A, B              |
| fedex        | A, B               | A, B     | means + residual folded into the base    | A, B, base weight |
| flora        | A, B (fresh/round) | A, B     | stacked product merged into the base     | stacked factors   |
| fedsa        | A, B (B stays)     | A        | mean of A; each client keeps its B       | A                 |
| rolora       | B even, A odd      | trained  | mean of the trained factor               | trained factor    |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation


class Aggregate(NamedTuple):
    """Server output for one LoRA module.

    b: new global B [d_out, r]; a: new global A [r, d_in];
    base_delta: update of the frozen weight in math orientation [d_out, d_in], before the LoRA
    scaling (the engine folds ``scaling * base_delta`` into the kernel), or None.
    """

    b: jax.Array
    a: jax.Array
    base_delta: jax.Array | None = None


def _both(round_index):
    return (1.0, 1.0)


def _always(round_index):
    return (True, True)


@dataclasses.dataclass(frozen=True)
class Method:
    """A federated LoRA method.

    Attributes:
      name: registry name.
      aggregate_fn: (B [U, d_out, r], A [U, r, d_in], w [U], round_index, key) -> Aggregate.
      trains: round_index -> (train_a, train_b) as 0/1 scalars (may be traced).
      uploads: round_index (host int) -> (A uploaded, B uploaded).
      downloads: round_index (host int) -> (A sent down, B sent down).
      modifies_base: the server folds ``base_delta`` into frozen weights.
      mean_based: the aggregate is the weighted mean of the uploads (so user-level DP-FedAvg,
        which replaces that mean by a noisy one, applies).
      keeps_local_b: clients keep their own B between rounds (FedSA); the server stores it.
      download_stacked: clients receive the stacked factors [d_out, K r] and [K r, d_in]
        instead of A and B (FLoRA).
    """

    name: str
    aggregate_fn: Callable[..., Aggregate]
    trains: Callable[[Any], tuple] = _both
    uploads: Callable[[int], tuple[bool, bool]] = _always
    downloads: Callable[[int], tuple[bool, bool]] = _always
    modifies_base: bool = False
    mean_based: bool = False
    keeps_local_b: bool = False
    download_stacked: bool = False


def _fedit(b, a, w, round_index, key):
    return Aggregate(*aggregation.fedit(b, a, w))


def _ffa(b, a, w, round_index, key):
    return Aggregate(*aggregation.ffa(b, a, w))


def _fedex(b, a, w, round_index, key):
    b_bar, a_bar, residual = aggregation.fedex(b, a, w)
    return Aggregate(b_bar, a_bar, residual)


def _flora(b, a, w, round_index, key):
    """Merges the exact stacked product into the base; clients restart from B = 0 and a fresh A
    (HF PEFT init) drawn from the server key, so it costs no download."""
    b_stacked, a_stacked = aggregation.flora_stack(b, a, w)
    rank, d_in = a.shape[1], a.shape[2]
    bound = 1.0 / math.sqrt(d_in)
    fresh_a = jax.random.uniform(key, (rank, d_in), jnp.float32, -bound, bound).astype(a.dtype)
    return Aggregate(jnp.zeros_like(b[0]), fresh_a, b_stacked.astype(jnp.float32) @ a_stacked.astype(jnp.float32))


def _fedsa(b, a, w, round_index, key):
    _, a_bar = aggregation.fedsa(b, a, w)
    b_bar = aggregation.weighted_mean(b, w).astype(b.dtype)  # the "global" model reported for FedSA uses the mean B
    return Aggregate(b_bar, a_bar)


def _rolora(b, a, w, round_index, key):
    return Aggregate(*aggregation.rolora(b, a, w, round_index))


def _rolora_trains(round_index):
    even = (jnp.asarray(round_index) % 2 == 0).astype(jnp.float32)
    return (1.0 - even, even)


def _rolora_sends(round_index: int):
    return (round_index % 2 == 1, round_index % 2 == 0)


OPTIONS = {
    "fedit": (), "ffa": (), "fedex": (), "flora": (), "fedsa": (), "rolora": (),
    "fra": ("split",), "fra_then_ffa": ("switch_round",), "flora_na": ("tol", "max_iter", "ridge"),
}
METHOD_NAMES = tuple(OPTIONS)


def options_for(name: str, options: dict | None) -> dict:
    """The options of method ``name`` from ``federation.method_options``, which is either the
    options of the configured method (``{switch_round: 5}``) or a mapping keyed by method name
    (``{fra_then_ffa: {switch_round: 5}, fra: {split: left}}``), so one config can serve a
    comparison of several methods."""
    options = dict(options or {})
    keyed = [k for k in options if k in OPTIONS]
    if keyed and len(keyed) != len(options):
        raise ValueError("federation.method_options mixes per-method sections "
                         f"({', '.join(keyed)}) with plain options ({', '.join(k for k in options if k not in OPTIONS)})")
    if keyed:
        section = options.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"federation.method_options.{name} must be a mapping, got {section!r}")
        return dict(section)
    return options


def make_method(name: str, options: dict | None = None, lora_rank: int = 8) -> Method:
    """Builds a method by registry name with its options from the config
    (``federation.method_options``; see :func:`options_for`)."""
    if name not in OPTIONS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    options = options_for(name, options)
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        allowed = ", ".join(OPTIONS[name]) or "none"
        raise ValueError(f"method {name!r}: unknown option(s) {', '.join(unknown)} (allowed: {allowed})")
    if name == "fedit":
        return Method(name, _fedit, mean_based=True)
    if name == "ffa":
        b_only = lambda r: (False, True)
        return Method(name, _ffa, trains=lambda r: (0.0, 1.0), uploads=b_only, downloads=b_only, mean_based=True)
    if name == "fra":
        split = options.get("split", "balanced")
        if split not in ("balanced", "left"):
            raise ValueError(f"method 'fra': option split must be balanced or left, got {split!r}")
        return Method(name, lambda b, a, w, r, k: Aggregate(*aggregation.fra(b, a, w, lora_rank, split)))
    if name == "fra_then_ffa":
        switch = options.get("switch_round")
        if not isinstance(switch, int) or switch < 1:
            raise ValueError(f"method 'fra_then_ffa' needs option switch_round, an int >= 1, got {switch!r}")
        return Method(
            name,
            lambda b, a, w, r, k: Aggregate(*aggregation.fra_then_ffa(b, a, w, r, switch, lora_rank)),
            trains=lambda r: (jnp.where(jnp.asarray(r) < switch, 1.0, 0.0), 1.0),
            uploads=lambda r: (r < switch, True),
            # the last FRA round still sends its A down: it is the A clients freeze
            downloads=lambda r: (r < switch, True),
        )
    if name == "flora_na":
        kwargs = {k: options[k] for k in ("tol", "max_iter", "ridge") if k in options}
        return Method(name, lambda b, a, w, r, k: Aggregate(*aggregation.flora_na(b, a, w, **kwargs)))
    if name == "fedex":
        return Method(name, _fedex, modifies_base=True)
    if name == "flora":
        return Method(name, _flora, modifies_base=True, download_stacked=True)
    if name == "fedsa":
        return Method(name, _fedsa, uploads=lambda r: (True, False), downloads=lambda r: (True, False),
                      keeps_local_b=True)
    return Method(name, _rolora, trains=_rolora_trains, uploads=_rolora_sends, downloads=_rolora_sends,
                  mean_based=True)

