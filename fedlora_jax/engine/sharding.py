"""The ``clients`` mesh: placing the replicated state and sharding the cohort's client axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def clients_mesh(devices: int) -> jax.sharding.Mesh:
    """The 1-D ``clients`` mesh over the first ``devices`` devices of all processes."""
    return jax.make_mesh((devices,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])


def everywhere(devices: int) -> jax.sharding.NamedSharding:
    """Whole arrays on every device of the ``clients`` mesh."""
    return jax.sharding.NamedSharding(clients_mesh(devices), jax.sharding.PartitionSpec())


def replicate(tree, devices: int):
    """``tree`` placed whole on every device of the mesh (the server state, the client rows);
    unchanged on one device."""
    if devices <= 1:
        return tree
    sharding = everywhere(devices)

    def put(x):  # from host values: devices of other processes cannot take a device array
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree)


def shard_clients(train, per_client: tuple, shared: tuple, reduced: bool, devices: int):
    """``train(per_client, shared)`` with the client axis of ``per_client`` (arrays [K, ...])
    sharded over the mesh's devices (``shard_map``) and ``shared`` (the state, the client rows)
    replicated on each; ``train`` must close over nothing else that is an array. The cohort is
    padded to a multiple of the device count with empty slots (zeros: no rows, weight 0)
    whose outputs are dropped. ``train`` returns (totals, stats) when ``reduced`` (totals are
    summed over devices) or (per-client outputs, stats).
    """
    if devices <= 1:
        return train(per_client, shared)
    k = jax.tree.leaves(per_client)[0].shape[0]
    pad = -k % devices
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    # PRNG keys travel as their key data
    key_impls = [jax.random.key_impl(x) if is_key(x) else None for x in jax.tree.leaves((per_client, shared))]
    treedef = jax.tree.structure((per_client, shared))
    padded = lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    as_data = lambda x: jax.random.key_data(x) if is_key(x) else x
    spec = jax.sharding.PartitionSpec

    def local(per_client_data, shared_data):
        leaves = [x if impl is None else jax.random.wrap_key_data(x, impl=impl)
                  for x, impl in zip(jax.tree.leaves((per_client_data, shared_data)), key_impls)]
        first, stats = train(*jax.tree.unflatten(treedef, leaves))
        return (jax.lax.psum(first, "clients") if reduced else first), stats

    out_first = spec() if reduced else spec("clients")
    # check_vma=False: with the check, a scan carry started from replicated zeros trained the
    # chunk's clients differently from one device (seen with jax 0.10.2); the psum is explicit
    first, stats = jax.shard_map(local, mesh=clients_mesh(devices), in_specs=(spec("clients"), spec()),
                                 out_specs=(out_first, spec("clients")), check_vma=False)(
        jax.tree.map(lambda x: padded(as_data(x)), per_client), jax.tree.map(as_data, shared))
    trim = lambda tree: jax.tree.map(lambda x: x[:k], tree)
    return (first if reduced else trim(first)), trim(stats)
