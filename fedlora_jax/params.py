"""Naming and slicing of trainable-parameter trees (LoRA factors + head).

The engine keeps the trainable state as an ``nnx.State`` pytree. Host-side, once, it reads the
leaf names (``layers.0.attention.query.lora_a``) and pairs each LoRA module's A and B leaves;
inside jit it works on the flat leaf list by those fixed indices.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np


def _key_name(entry) -> str | None:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return None


def leaf_names(tree) -> list[str]:
    """Dotted names of the leaves of ``tree``, in ``jax.tree.leaves`` order."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        # a Variable's own ``.value`` attribute is not part of the name (a layer called "value" is)
        parts = [_key_name(p) for p in path if not isinstance(p, jax.tree_util.GetAttrKey)]
        names.append(".".join(p for p in parts if p is not None))
    return names


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """Leaf indices of one adapted layer's factors. A is [r, d_in], B is [d_out, r]."""

    name: str
    a_index: int
    b_index: int
    a_shape: tuple
    b_shape: tuple


@dataclasses.dataclass(frozen=True)
class TrainableLayout:
    """What the engine needs to know about the trainable tree, computed once on the host."""

    modules: tuple[LoraModule, ...]
    other_indices: tuple[int, ...]  # head and any other non-LoRA trainable leaves

    def shape_groups(self) -> list[list[LoraModule]]:
        """Modules grouped by (A shape, B shape); each group is aggregated in one vmapped call."""
        groups = defaultdict(list)
        for m in self.modules:
            groups[(m.a_shape, m.b_shape)].append(m)
        return list(groups.values())


def trainable_layout(tree) -> TrainableLayout:
    names = leaf_names(tree)
    leaves = jax.tree.leaves(tree)
    by_name = {n: i for i, n in enumerate(names)}
    modules, used = [], set()
    for name, i in by_name.items():
        if name.endswith(".lora_a"):
            prefix = name[: -len(".lora_a")]
            j = by_name.get(prefix + ".lora_b")
            if j is None:
                raise ValueError(f"LoRA module {prefix} has lora_a but no lora_b")
            modules.append(LoraModule(prefix, i, j, tuple(leaves[i].shape), tuple(leaves[j].shape)))
            used.update((i, j))
    others = tuple(i for i in range(len(names)) if i not in used)
    return TrainableLayout(tuple(modules), others)


def factor_mask(layout: TrainableLayout, tree, train_a, train_b):
    """A tree like ``tree`` of scalar multipliers: ``train_a`` on A leaves, ``train_b`` on B
    leaves, 1 elsewhere (the head always trains). Scalars may be traced."""
    leaves, treedef = jax.tree.flatten(tree)
    scale = [jnp.ones((), jnp.float32)] * len(leaves)
    for m in layout.modules:
        scale[m.a_index] = jnp.asarray(train_a, jnp.float32)
        scale[m.b_index] = jnp.asarray(train_b, jnp.float32)
    return jax.tree.unflatten(treedef, scale)


def leaf_bytes(tree) -> np.ndarray:
    """Bytes of each leaf, in leaf order."""
    return np.array([int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)], np.int64)
