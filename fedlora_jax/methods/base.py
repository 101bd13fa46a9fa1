"""The method protocol and the registry.

A :class:`Method` is one object that says what clients train, what travels, what it keeps at the
server between rounds and how the server turns the cohort's uploads into the next global state.
The round (:mod:`fedlora_jax.engine.round`) calls these hooks and names no method. Methods are found by
registry name (:func:`register_method`) or, from a config, by ``package.module:factory``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation
from fedlora_jax.params import TrainableLayout


class Aggregate(NamedTuple):
    """Server output for one LoRA module.

    b: new global B [d_out, r]; a: new global A [r, d_in];
    base_delta: update of the frozen weight in math orientation [d_out, d_in], before the LoRA
    scaling (the engine folds ``scaling * base_delta`` into the kernel), or None.
    """

    b: jax.Array
    a: jax.Array
    base_delta: jax.Array | None = None


def ideal_update(b, a, w) -> jax.Array:
    """The ideal update M = sum_k w_k B_k A_k [d_out, d_in] in float32 from B [K, d_out, r], A [K, r, d_in], w [K]."""
    f32 = jnp.float32
    return jnp.einsum("k,kor,kri->oi", w.astype(f32), b.astype(f32), a.astype(f32))


class LoraBytes(NamedTuple):
    """Bytes of one copy of every LoRA module's A, of every B, and of every adapted base kernel."""

    a: int
    b: int
    base: int


class ServerUpdate(NamedTuple):
    """What :meth:`Method.update_state` sees of a round (arrays over the cohort have a [K] axis)."""

    before: Any  # the global trainable state the cohort started from
    after: Any  # the aggregate (or the user-level DP mean) of the cohort's uploads
    client_params: Any  # the cohort's trained states, leaves [K, ...]; None in a streamed round
    cohort: jax.Array  # [K] client ids
    taking_part: jax.Array  # [K] 0/1: the slot's client took part
    round_index: jax.Array  # int32 scalar
    layout: TrainableLayout


class Method:
    """A federated LoRA method. Subclass it, set ``name`` and override what differs.

    The defaults describe FedIT: clients train A and B, both travel both ways, the server averages
    each factor (``aggregate`` must be overridden), no server state.

    Attributes:
      name: the name runs and logs use (set by :func:`make_method` to the config's name).
      mean_based: the new global state is the weighted mean of the uploads, so user-level
        DP-FedAvg (which replaces that mean by a clipped, noisy one) applies.
      modifies_base: ``aggregate`` returns ``base_delta``; the frozen base changes every round
        (it is then checkpointed, checked for NaN and exported merged).
      streaming: the server update is a reduction over chunks of clients (:meth:`summarise`
        adds up, :meth:`finalise` finishes), so a chunked round never holds the whole cohort's
        trained states; methods without it get the cohort's stacked uploads (:meth:`aggregate`).
    """

    name: str = "method"
    mean_based: bool = False
    modifies_base: bool = False
    streaming: bool = False

    # -- what clients train and what travels --------------------------------------------------

    def trains(self, round_index) -> tuple:
        """(train_a, train_b): 0/1 multipliers of the A and B gradients; ``round_index`` may be traced."""
        return (1.0, 1.0)

    def uploads(self, round_index: int) -> tuple[bool, bool]:
        """(A uploaded, B uploaded) in round ``round_index`` (host int)."""
        return (True, True)

    def downloads(self, round_index: int) -> tuple[bool, bool]:
        """(A sent down, B sent down) in round ``round_index`` (host int)."""
        return (True, True)

    def download_bytes(self, round_index: int, sizes: LoraBytes, clients: int) -> int:
        """LoRA (and base) bytes one client receives; ``clients`` took part in the round."""
        send_a, send_b = self.downloads(round_index)
        return sizes.a * send_a + sizes.b * send_b

    def upload_bytes(self, round_index: int, sizes: LoraBytes) -> int:
        """LoRA bytes one client sends."""
        send_a, send_b = self.uploads(round_index)
        return sizes.a * send_a + sizes.b * send_b

    # -- server state ---------------------------------------------------------------------------

    def init_state(self, params, layout: TrainableLayout, num_clients: int) -> Any:
        """The method's server state before round 0 (a pytree of arrays; () for none)."""
        return ()

    @property
    def keeps_client_state(self) -> bool:
        """Clients keep part of their model between rounds (:meth:`client_start` differs per client)."""
        return False

    def client_start(self, state, params, cohort: jax.Array, layout: TrainableLayout):
        """The trainable state each cohort client starts from: leaves [K, ...]; default the global one."""
        k = cohort.shape[0]
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), params)

    # -- the server update ----------------------------------------------------------------------

    def aggregate(self, b, a, w, round_index, key) -> Aggregate:
        """One LoRA module's new global factors from the cohort's B [K, d_out, r], A [K, r, d_in] and
        weights w [K] (>= 0, sum 1); ``round_index`` is traced, ``key`` is this module's PRNG key.
        Pure and vmappable over a leading module axis.

        A streaming method does not write it: it is its reduction (:meth:`summarise`, then
        :meth:`finalise`) run on the cohort as one chunk, with slot 0's factors as those the clients
        started from (equal to them in every factor the method leaves untrained)."""
        if not self.streaming:
            raise NotImplementedError(f"method {self.name!r} does not define aggregate")
        return self.finalise(self.summarise(b, a, w), ideal_update(b, a, w), b[0], a[0], round_index, key)

    def divergence(self, b, a, w, out: Aggregate) -> jax.Array:
        """The module's normalised aggregation error ||B_hat A_hat - M|| / ||M|| (scalar); a
        streaming method's is :meth:`streamed_divergence` of the ideal update M."""
        if self.streaming:
            return self.streamed_divergence(ideal_update(b, a, w), out)
        return aggregation.divergence(b, a, w, out.b, out.a)

    # -- streaming (methods with ``streaming = True``) -------------------------------------------

    def summarise(self, b, a, w) -> Any:
        """An additive summary of one module's uploads from a chunk of C clients (b [C, d_out, r],
        a [C, r, d_in], w [C]: the clients' round weights, which sum to 1 over the cohort): the
        summaries of the chunks add up to that of the cohort."""
        raise NotImplementedError(f"method {self.name!r} does not stream")

    def finalise(self, summary, ideal, b_before, a_before, round_index, key) -> Aggregate:
        """The module's aggregate from the cohort's summary, its dense ideal update
        M = sum w B A [d_out, d_in] (float32; the engine streams it for the divergence metric)
        and the global factors the clients started from (b_before [d_out, r], a_before
        [r, d_in]); equals :meth:`aggregate` on the stacked uploads up to float rounding."""
        raise NotImplementedError(f"method {self.name!r} does not stream")

    def streamed_divergence(self, ideal, out: Aggregate) -> jax.Array:
        """The normalised aggregation error from the dense ideal update M [d_out, d_in] (summed over
        chunks): ||B_hat A_hat - M|| / ||M||."""
        return aggregation.dense_divergence(ideal, out.b, out.a)

    def update_state(self, state, update: ServerUpdate):
        """(new global trainable state, new method state) after aggregation; by default the
        aggregate and the state unchanged. Server optimisers (momentum) and per-client banks
        (FedSA) live here."""
        return update.after, state


# ---------------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str, factory: Callable[..., Method] | None = None):
    """Registers ``factory`` under ``name``; usable as a decorator (``@register_method("mine")``).

    ``factory(**options)`` returns a :class:`Method`. Its keyword parameters are the options a
    config may set under ``federation.method_options``; a parameter named ``rank`` is not an
    option: it receives the LoRA rank (``lora.rank``).
    """
    if factory is None:
        return lambda f: register_method(name, f)
    if not name or ":" in name:
        raise ValueError(f"method names are non-empty and have no ':' (that marks module:factory), got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def streaming_methods() -> tuple[str, ...]:
    """Registered methods that stream (built with their default options; a method that needs
    options to be built is left out)."""
    names = []
    for name in _REGISTRY:
        try:
            if make_method(name).streaming:
                names.append(name)
        except ValueError:
            continue
    return tuple(names)


def _is_method_key(key: str) -> bool:
    return key in _REGISTRY or ":" in key


def options_for(name: str, options: dict | None) -> dict:
    """The options of method ``name`` from ``federation.method_options``, which is either the
    options of the configured method (``{switch_round: 5}``) or a mapping keyed by method name
    (``{fra_then_ffa: {switch_round: 5}, fra: {split: left}}``), so one config can serve a
    comparison of several methods."""
    options = dict(options or {})
    keyed = [k for k in options if _is_method_key(k)]
    if keyed and len(keyed) != len(options):
        raise ValueError(
            "federation.method_options mixes per-method sections "
            f"({', '.join(keyed)}) with plain options ({', '.join(k for k in options if not _is_method_key(k))})"
        )
    if keyed:
        section = options.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"federation.method_options.{name} must be a mapping, got {section!r}")
        return dict(section)
    return options


def _factory(name: str) -> Callable[..., Method]:
    if ":" not in name:
        if name not in _REGISTRY:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)} "
                             "or name a plug-in as package.module:factory")
        return _REGISTRY[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"method {name!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"method {name!r}: {module_name} has no callable {attr!r}")
    return factory


def make_method(name: str, options: dict | None = None, lora_rank: int = 8) -> Method:
    """Builds a method by registry name or ``package.module:factory`` with its options from the
    config (``federation.method_options``; see :func:`options_for`)."""
    factory = _factory(name)
    options = options_for(name, options)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p, v in params.items() if p != "rank" and v.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(options) - set(allowed)) if not takes_any else sorted({"rank"} & set(options))
    if unknown:
        raise ValueError(
            f"method {name!r}: unknown option(s) {', '.join(unknown)} (allowed: {', '.join(allowed) or 'none'})"
        )
    missing = [p for p, v in params.items() if p != "rank" and p not in options and v.default is inspect.Parameter.empty
               and v.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise ValueError(f"method {name!r} needs option(s) {', '.join(missing)} in federation.method_options")
    if "rank" in params:
        options["rank"] = lora_rank
    method = factory(**options)
    if not isinstance(method, Method):
        raise ValueError(f"method {name!r}: the factory returned {type(method).__name__}, not a fedlora_jax Method")
    method.name = name
    return method
