"""LoRA for NNX models: injection into named linear layers, trainable/frozen split, merging.

Paper notation throughout: for a frozen linear map with Flax kernel ``W`` of shape
[d_in, d_out], LoRA adds ``delta W = s * B @ A`` in the math orientation (d_out x d_in), with
``B`` of shape [d_out, r] (zero init) and ``A`` of shape [r, d_in]. The factors are stored in
this orientation (``lora_b``, ``lora_a``) so that stacked client factors are directly
``B [U, d_out, r]`` and ``A [U, r, d_in]``; the only place that converts to the Flax kernel
orientation is :func:`LoRALinear.__call__` (and :func:`merge_lora`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ALL_LINEAR = "all-linear"


class LoRAParam(nnx.Param):
    """Variable type of LoRA factors (trainable)."""


# Trainable = LoRA factors + the task head (a submodule called ``head``). Everything else is frozen.
TRAINABLE = nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.PathContains("head")))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Where and how LoRA is injected.

    Attributes:
      rank: r, the adapter rank (> 0).
      alpha: scaling numerator; the scale is alpha / r (or alpha / sqrt(r) with ``rslora``).
      targets: names of linear layers to adapt. A name matches a layer whose attribute name
        equals it, or whose dotted path (``layers.0.attention.query``) it fully matches as a
        regular expression. ``("all-linear",)`` adapts every linear layer except the head.
        ``None`` uses the model's ``default_lora_targets``.
      rslora: use rank-stabilised scaling alpha / sqrt(r).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] | None = None
    rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Tap:
    """A hook on one layer for one forward pass (book-keeping DP-SGD).

    It records the layer's input and adds ``zero`` (zeros of the output's shape) to the output, so
    the gradient with respect to ``zero`` is the gradient at the layer's output: with the input,
    all a per-example gradient of the layer's parameters needs. ``zero=None`` only records (a
    shape pass).
    """

    def __init__(self, zero: jax.Array | None = None):
        self.zero = zero
        self.input: jax.Array | None = None
        self.output: jax.Array | None = None

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        self.input, self.output = x, y
        return y if self.zero is None else y + self.zero


def attach_tap(layer: nnx.Module, tap: Tap) -> None:
    """Hooks ``tap`` onto a merged layer for the rest of this trace (not part of the graph state)."""
    object.__setattr__(layer, "tap", tap)


def _tapped(layer: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    tap = layer.__dict__.get("tap")
    return y if tap is None else tap(x, y)


class ClientRouting:
    """Per-client trainable parameters inside one stream shared by C clients.

    The trainable leaves carry a leading client axis [C, ...] (the frozen base is shared); a
    trainable layer applies client c's parameters to client c's inputs, which are either stream
    tokens ([1, T, d], a token's client from its segment) or per-example rows ([C b, d], the b rows
    of each client in client order, e.g. pooled features reaching a head).

    Args:
      token_clients: [T] int32, the client of each stream token (C on unused tokens).
      clients: C.
    """

    def __init__(self, token_clients: jax.Array, clients: int):
        self.token_clients = token_clients
        self.clients = clients

    def _one_hot(self, dtype) -> jax.Array:  # [T, C]; all zero on unused tokens
        return (self.token_clients[:, None] == jnp.arange(self.clients)[None, :]).astype(dtype)

    def low_rank(self, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """(x A_c^T) B_c^T with each input's own client c: x [1, T, d_in] or [C b, d_in],
        a [C, r, d_in], b [C, d_out, r] -> [1, T, d_out] or [C b, d_out]."""
        if x.ndim == 3:
            down = jnp.einsum("td,crd->tcr", x[0], a) * self._one_hot(x.dtype)[:, :, None]
            return jnp.einsum("tcr,cor->to", down, b)[None]
        rows = x.reshape(self.clients, -1, x.shape[-1])
        out = jnp.einsum("cnr,cor->cno", jnp.einsum("cnd,crd->cnr", rows, a), b)
        return out.reshape(x.shape[0], -1)

    def linear(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
        """x W_c + b_c on per-example rows: x [C b, d_in], kernel [C, d_in, d_out], bias [C, d_out]."""
        if x.ndim != 2:
            raise ValueError(f"a per-client linear layer on a shared stream takes per-example rows [C b, d], "
                             f"got {x.shape}")
        out = jnp.einsum("cni,cio->cno", x.reshape(self.clients, -1, x.shape[-1]), kernel)
        if bias is not None:
            out = out + bias[:, None, :]
        return out.reshape(x.shape[0], -1)


def route_clients(model: nnx.Module, routing: ClientRouting) -> None:
    """Makes every trainable layer of a merged model (LoRA factors and heads with a leading client
    axis) apply per-client parameters for the rest of this trace (not part of the graph state)."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, (LoRALinear, Linear)):
            object.__setattr__(module, "routing", routing)


class Linear(nnx.Linear):
    """``nnx.Linear`` that can be tapped (:class:`Tap`) and routed per client
    (:func:`route_clients`): the kind of a trainable task head."""

    def __call__(self, x: jax.Array) -> jax.Array:
        routing = self.__dict__.get("routing")
        if routing is None:
            return _tapped(self, x, super().__call__(x))
        bias = None if self.bias is None else self.bias[...]
        return _tapped(self, x, routing.linear(x, self.kernel[...], bias))


class LoRALinear(nnx.Module):
    """A frozen linear layer plus a low-rank update: y = x W + b + s * (x A^T) B^T.

    Shapes: kernel [d_in, d_out] (Flax), bias [d_out] or None, lora_a [r, d_in],
    lora_b [d_out, r].
    """

    def __init__(self, base: nnx.Linear, rank: int, scaling: float, key: jax.Array):
        d_in, d_out = base.kernel[...].shape
        self.in_features, self.out_features = d_in, d_out
        self.kernel = base.kernel
        self.bias = base.bias
        self.scaling = float(scaling)
        bound = 1.0 / math.sqrt(d_in)  # HF PEFT: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(d_in), +)
        self.lora_a = LoRAParam(jax.random.uniform(key, (rank, d_in), jnp.float32, -bound, bound))
        self.lora_b = LoRAParam(jnp.zeros((d_out, rank), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., d_in] -> [..., d_out] in x's dtype; the low-rank path runs in the factors' dtype
        (float32) whatever the base's (bfloat16 under mixed precision)."""
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        a, b = self.lora_a[...], self.lora_b[...]
        routing = self.__dict__.get("routing")
        if routing is None:  # x [..., d_in] (bfloat16 or float32) against the float32 A: no float32 copy of x
            down = jax.lax.dot_general(x, a, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=a.dtype)
            delta = down @ b.T
        else:
            delta = routing.low_rank(x.astype(a.dtype), a, b)
        return y + _tapped(self, x, self.scaling * delta).astype(y.dtype)


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _matches(path: tuple, targets: Sequence[str]) -> bool:
    if not path or "head" in path:  # the task head trains in full: no LoRA inside it
        return False
    if ALL_LINEAR in targets:
        return not any(p in ("head", "lm_head") for p in path)
    name, dotted = str(path[-1]), _path_name(path)
    return any(name == t or re.fullmatch(t, dotted) for t in targets)


def _get_child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def inject_lora(model: nnx.Module, config: LoRAConfig, key: jax.Array) -> list[str]:
    """Replaces target ``nnx.Linear`` layers of ``model`` in place by :class:`LoRALinear`.

    Each adapted layer draws its A from ``fold_in(key, i)``, so one server-side key fixes every
    client's initial A (FFA-LoRA relies on this). Returns the dotted paths adapted; raises
    ``ValueError`` when nothing matches.
    """
    targets = tuple(config.targets or getattr(model, "default_lora_targets", ()))
    if not targets:
        raise ValueError("no LoRA targets given and the model declares no default_lora_targets")
    found = [
        (path, module)
        for path, module in nnx.iter_graph(model)
        if isinstance(module, nnx.Linear) and _matches(path, targets)
    ]
    if not found:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of {type(model).__name__}")
    for i, (path, module) in enumerate(found):
        parent = model
        for p in path[:-1]:
            parent = _get_child(parent, p)
        adapted = LoRALinear(module, config.rank, config.scaling, jax.random.fold_in(key, i))
        if isinstance(path[-1], int):
            parent[path[-1]] = adapted
        else:
            setattr(parent, path[-1], adapted)
    return [_path_name(p) for p, _ in found]


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by dotted path."""
    return {_path_name(p): m for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}


def merge_lora(model: nnx.Module) -> None:
    """Folds every adapter into its base kernel in place (W += s (B A)^T) and zeroes B."""
    for layer in lora_layers(model).values():
        delta = layer.scaling * (layer.lora_b[...] @ layer.lora_a[...])
        layer.kernel[...] = layer.kernel[...] + delta.T.astype(layer.kernel.dtype)
        layer.lora_b[...] = jnp.zeros_like(layer.lora_b[...])


def float32_trainable(model: nnx.Module) -> None:
    """Mixed precision: keeps the trainable state in float32 whatever the base's dtype. The task
    head's parameters are cast to float32 and it computes in float32 (it reads the base's
    bfloat16 features); LoRA factors are float32 from :func:`inject_lora` on."""
    for path, module in nnx.iter_graph(model):
        if not (isinstance(module, nnx.Module) and "head" in path):
            continue
        if hasattr(module, "dtype"):
            module.dtype = jnp.float32
        for name, value in vars(module).items():
            if isinstance(value, nnx.Param) and not isinstance(value, LoRAParam):
                value.set_value(value.get_value().astype(jnp.float32))


def split_model(model: nnx.Module):
    """Splits a model once into (graphdef, trainable state, frozen state).

    Trainable is the LoRA factors plus the task head; frozen is everything else.
    """
    return nnx.split(model, TRAINABLE, ...)
