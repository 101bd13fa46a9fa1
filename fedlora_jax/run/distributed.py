"""Multi-process runs (several hosts, or several processes on one host) with ``jax.distributed``.

Every process runs the same command on the same config. Each loads the data and the model,
holds the server state replicated, and trains its devices' share of every cohort: the round's
client axis is sharded over the devices of all processes (:meth:`fedlora_jax.engine.Federation.mesh`)
and the reductions are all-reduced across them. Process 0 alone writes the run directory.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins a multi-process run, before JAX starts a backend. Each argument falls back to its
    environment variable (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
    with none of them set, a SLURM job step of several tasks is detected by JAX itself. Returns
    False (a single-process run) when there is nothing to join."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    slurm = _env_int("SLURM_NTASKS") or 1
    if not any(given) and slurm <= 1:
        return False
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs the coordinator address, the process count and this process's id "
                         "(--coordinator HOST:PORT --num-processes N --process-id I, or JAX_COORDINATOR_ADDRESS, "
                         "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if all(given) and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise ValueError(
            f"--process-id must be in 0..{num_processes - 1} for {num_processes} processes, got {process_id}"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes all-reduce over gloo
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip().lstrip("-").isdigit():
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}")
    return int(value)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always, in a single-process run)."""
    return jax.process_index() == 0
