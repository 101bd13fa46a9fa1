"""Memory planned, not guessed: what a round needs per device, from XLA's analysis of the compiled
round itself (``compiled.memory_analysis()``), not from a formula.

:func:`round_memory` compiles a federation's round for abstract inputs (nothing is allocated) and
reads its per-device bytes: arguments (the frozen base, the global state, the client rows),
outputs, the donated part they share, and temporaries (activations, the chunk's trained states,
gradients). :func:`memory_plan` compiles the round at one and two clients per chunk to split the
peak into a fixed part and a part per client of a chunk (activations of its local step and its
trainable state), with and without rematerialisation, and picks the largest chunk that fits a
byte budget. ``fedlora-jax describe CONFIG --plan`` prints it; ``federation.clients_per_chunk:
auto`` on an accelerator uses it (:func:`fedlora_jax.run.build.build_experiment`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from fedlora_jax.config import ConfigError
from fedlora_jax.engine import Federation, device_shards
from fedlora_jax.engine.sharding import map_shardings
from fedlora_jax.models.remat import set_remat


@dataclasses.dataclass(frozen=True)
class RoundMemory:
    """Per-device bytes of one compiled round (XLA's memory analysis)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int

    @property
    def peak(self) -> int:
        """Arguments, outputs not aliased to them, and temporaries: the round's peak."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def abstract_inputs(federation: Federation, params, frozen, data):
    """(server state, client shards) of a round as shapes with their shardings (nothing allocated)."""
    state = jax.eval_shape(lambda p, f: federation.initial_state(p, f, 0), params, frozen)
    shards = jax.eval_shape(lambda: device_shards(data))
    if federation.devices <= 1:
        return state, shards
    struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return (map_shardings(struct, state, federation.state_shardings(state)),
            map_shardings(struct, shards, federation.everywhere))


def round_memory(federation: Federation, params, frozen, data) -> RoundMemory:
    """Compiles ``federation``'s round for ``data`` and returns its per-device memory."""
    state, shards = abstract_inputs(federation, params, frozen, data)
    compiled = federation.compile_round(template=state).lower(state, shards).compile()
    stats = compiled.memory_analysis()
    return RoundMemory(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                       int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes))


def with_remat(federation: Federation, params, frozen, policy: str | None) -> Federation:
    """``federation`` whose clients' model runs with remat ``policy`` (a new graphdef)."""
    model = nnx.merge(federation.trainer.graphdef, params, frozen)
    set_remat(model, policy)
    trainer = dataclasses.replace(federation.trainer, graphdef=nnx.graphdef(model))
    return dataclasses.replace(federation, trainer=trainer)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """A round's memory per device, split as the chunk size moves it.

    base: the frozen base's bytes on one device (its share over ``model`` devices).
    fixed: the peak's part that does not grow with the chunk (the base, the global state, the
      client rows, the round's outputs, and what the whole cohort needs: stacked trained states).
    per_client: bytes each client of a chunk adds under the run's own remat setting (its step's
      activations, gradients and optimiser state; peak(2 clients) - peak(1 client)).
    per_client_plain / per_client_remat: the same without remat and with ``model.remat: layer``
      (None where not measured).
    tokens_per_client: tokens one client's local step computes (rows x stream length).
    budget: bytes the round may use (``memory_fraction`` of the device).
    chunk: the largest chunk (at most the device's share of the cohort) whose peak fits ``budget``;
      0 when not even one client does.
    """

    base: int
    fixed: int
    per_client: int
    per_client_plain: int | None
    per_client_remat: int | None
    tokens_per_client: int
    budget: int
    chunk: int

    def peak(self, clients: int) -> int:
        return self.fixed + clients * self.per_client


def step_tokens(federation: Federation, data) -> int:
    """Tokens one client's local step computes: the longest packed stream, or its rows x row length."""
    trainer = federation.trainer
    rows = trainer.dp.buffer_size if trainer.dp is not None and trainer.dp.poisson else trainer.batch_size
    if trainer.streams.token_buckets and not trainer.streams.shared:
        return int(trainer.streams.token_buckets[-1])
    return int(rows * data.train["attention_mask"].shape[-1])


def base_bytes(federation: Federation, frozen) -> int:
    """Bytes of the frozen base on one device (its shards over the ``model`` axis)."""
    shardings = jax.tree.leaves(federation.base_shardings(frozen))
    return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(frozen), shardings)))


def memory_plan(federation: Federation, params, frozen, data, share: int, budget: int, remat: str | None,
                compare_remat: bool = True) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``federation``'s round on ``data`` (its model run with remat
    policy ``remat``): compiled at chunks of 1 and 2 clients, and again with the other remat
    setting when ``compare_remat``; the chunk chosen for ``budget`` bytes per device (``share``:
    the most clients one device trains)."""

    def measure(fed: Federation) -> tuple[int, int]:  # (fixed, per client)
        one = round_memory(dataclasses.replace(fed, clients_per_chunk=1), params, frozen, data)
        if share < 2:
            return one.peak, 0
        two = round_memory(dataclasses.replace(fed, clients_per_chunk=2), params, frozen, data).peak
        per_client = max(two - one.peak, 0)
        # the fixed part holds at least the round's inputs and outputs (a chunk of the whole share
        # compiles without the chunk loop, so the two peaks need not be exactly linear)
        return max(one.peak - per_client, one.peak - one.temporaries), per_client

    fixed, per_client = measure(federation)
    plain = per_client if remat is None else None
    rematted = per_client if remat == "layer" else None
    if compare_remat and plain is None:
        plain = measure(with_remat(federation, params, frozen, None))[1]
    if compare_remat and rematted is None:
        rematted = measure(with_remat(federation, params, frozen, "layer"))[1]
    fits = (budget - fixed) // per_client if per_client else share
    chunk = int(max(0, min(share, fits)))
    return MemoryPlan(base_bytes(federation, frozen), fixed, per_client, plain, rematted,
                      step_tokens(federation, data), budget, chunk)


def refuse_if_unfit(plan: MemoryPlan, remat: str | None) -> None:
    """One line naming what to change when not even one client's round fits the budget."""
    if plan.chunk >= 1:
        return
    hints = ([] if remat == "layer" else ["model.remat: layer"]) + [
        "model.quantize: int8 or nf4", "a larger federation.model_devices", "a smaller data.max_length"]
    raise ConfigError(f"one client's round needs {plan.peak(1) / 2**30:.2f} GiB per device, more than the "
                      f"{plan.budget / 2**30:.2f} GiB budget (federation.memory_fraction of the device); "
                      f"try {', '.join(hints)}")


def planned_chunk(federation: Federation, params, frozen, data, share: int, budget: int,
                  remat: str | None) -> int | None:
    """``clients_per_chunk: auto`` on an accelerator: the largest chunk of clients whose compiled
    round fits ``budget`` bytes per device, in even chunks of the device's ``share`` (None: the
    whole share at once); :class:`ConfigError` when not even one client fits."""
    plan = memory_plan(federation, params, frozen, data, share, budget, remat, compare_remat=False)
    refuse_if_unfit(plan, remat)
    if plan.chunk >= share:
        return None
    return -(-share // -(-share // plan.chunk))  # as many chunks as that needs, sized evenly
