"""The device mesh: a ``clients`` axis the cohort is sharded over and, with ``model_devices`` > 1, a
``model`` axis the frozen base is split over (tensor-parallel, docs/scale.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.params import leaf_names

spec = jax.sharding.PartitionSpec

# Megatron-style tensor parallelism by module name: column-parallel layers split their outputs
# (kernel [d_in, d_out] over d_out), row-parallel ones their inputs (over d_in), so a
# column -> row pair needs one reduction. Other large leaves split their largest divisible axis.
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query", "key", "value",
                             "intermediate"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "attention_output", "output"})
SMALL_LEAF = 4096  # elements; smaller leaves (norms, biases) stay whole on every device


def make_mesh(devices: int, model_devices: int = 1) -> jax.sharding.Mesh:
    """The mesh over the first ``devices`` devices of all processes: 1-D ``clients`` or, with
    ``model_devices`` > 1, 2-D ``clients`` x ``model`` (devices = clients x model; consecutive
    devices, one process's where they divide, form a model group)."""
    auto = jax.sharding.AxisType.Auto
    if model_devices <= 1:
        return jax.make_mesh((devices,), ("clients",), axis_types=(auto,), devices=jax.devices()[:devices])
    return jax.make_mesh((devices // model_devices, model_devices), ("clients", "model"), axis_types=(auto, auto),
                         devices=jax.devices()[:devices])


def client_groups(mesh: jax.sharding.Mesh) -> int:
    """Devices the cohort is split over (the ``clients`` axis)."""
    return mesh.shape["clients"]


def everywhere(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Whole arrays on every device of the mesh."""
    return jax.sharding.NamedSharding(mesh, spec())


def base_spec(name: str, shape: tuple[int, ...], model_devices: int) -> jax.sharding.PartitionSpec:
    """How one frozen leaf (dotted ``name``, ``shape``) is split over the ``model`` axis.

    Kernels of column/row-parallel layers (:data:`COLUMN_PARALLEL`, :data:`ROW_PARALLEL`, named by
    the module that holds the ``kernel``, quantized or not) split d_out / d_in; any other leaf of
    at least :data:`SMALL_LEAF` elements splits its largest axis that divides by
    ``model_devices``; the rest (norms, biases) is whole on every device.
    """
    if model_devices <= 1:
        return spec()
    parts = name.split(".")
    module = parts[parts.index("kernel") - 1] if "kernel" in parts[1:] else None
    if len(shape) == 2 and module in COLUMN_PARALLEL and shape[1] % model_devices == 0:
        axis = 1
    elif len(shape) == 2 and module in ROW_PARALLEL and shape[0] % model_devices == 0:
        axis = 0
    elif int(np.prod(shape)) >= SMALL_LEAF:
        divisible = [(n, i) for i, n in enumerate(shape) if n % model_devices == 0]
        axis = max(divisible)[1] if divisible else None
    else:
        axis = None
    return spec() if axis is None else spec(*([None] * axis + ["model"]))


def base_shardings(frozen, mesh: jax.sharding.Mesh, model_devices: int):
    """A tree like ``frozen`` of where each leaf lives: split over the ``model`` axis as
    :func:`base_spec` says, whole on every client group."""
    return jax.tree.unflatten(jax.tree.structure(frozen), [
        jax.sharding.NamedSharding(mesh, base_spec(name, x.shape, model_devices))
        for name, x in zip(leaf_names(frozen), jax.tree.leaves(frozen))])


def replicate(tree, mesh: jax.sharding.Mesh):
    """``tree`` placed whole on every device of the mesh (the server state, the client rows);
    unchanged on a mesh of one device."""
    if mesh.size <= 1:
        return tree
    return place(tree, everywhere(mesh))


def map_shardings(fn, tree, shardings):
    """``fn(leaf, sharding)`` over ``tree``, each leaf with its sharding from ``shardings`` (one
    sharding, or a prefix tree of shardings, e.g. :meth:`Federation.state_shardings`)."""
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: fn(x, s), sub), shardings, tree, is_leaf=is_sharding)


def place(tree, shardings):
    """``tree`` put on devices as ``shardings`` (one sharding, or a prefix tree of shardings) says,
    from host values: devices of other processes cannot take a device array."""

    def put(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return map_shardings(put, tree, shardings)


def shard_clients(train, per_client: tuple, shared: tuple, reduced: bool, mesh: jax.sharding.Mesh):
    """``train(per_client, shared)`` with the client axis of ``per_client`` (arrays [K, ...])
    sharded over the mesh's ``clients`` axis (``shard_map``) and ``shared`` (the state, the client
    rows) whole on each client group; ``train`` must close over nothing else that is an array.
    Over a ``model`` axis the map is automatic: the frozen base keeps its split and the compiler
    partitions each group's computation over its model devices. The cohort is padded to a
    multiple of the client groups with empty slots (zeros: no rows, weight 0) whose outputs are
    dropped. ``train`` returns (totals, stats) when ``reduced`` (totals are summed over the
    groups) or (per-client outputs, stats).
    """
    groups = client_groups(mesh)
    if groups <= 1:  # one client group: nothing to map (a base over model devices is split by the compiler)
        return train(per_client, shared)
    k = jax.tree.leaves(per_client)[0].shape[0]
    pad = -k % groups
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    # PRNG keys travel as their key data
    key_impls = [jax.random.key_impl(x) if is_key(x) else None for x in jax.tree.leaves((per_client, shared))]
    treedef = jax.tree.structure((per_client, shared))
    padded = lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    as_data = lambda x: jax.random.key_data(x) if is_key(x) else x

    def local(per_client_data, shared_data):
        leaves = [x if impl is None else jax.random.wrap_key_data(x, impl=impl)
                  for x, impl in zip(jax.tree.leaves((per_client_data, shared_data)), key_impls)]
        first, stats = train(*jax.tree.unflatten(treedef, leaves))
        return (jax.lax.psum(first, "clients") if reduced else first), stats

    out_first = spec() if reduced else spec("clients")
    # check_vma=False: with the check, a scan carry started from replicated zeros trained the
    # chunk's clients differently from one device (seen with jax 0.10.2); the psum is explicit
    first, stats = jax.shard_map(local, mesh=mesh, in_specs=(spec("clients"), spec()),
                                 out_specs=(out_first, spec("clients")), axis_names={"clients"}, check_vma=False)(
        jax.tree.map(lambda x: padded(as_data(x)), per_client), jax.tree.map(as_data, shared))
    trim = lambda tree: jax.tree.map(lambda x: x[:k], tree)
    return (first if reduced else trim(first)), trim(stats)
