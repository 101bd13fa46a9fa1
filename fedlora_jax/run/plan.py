"""The run's plan, decided once before anything runs: the device count and mesh, each device's
share of the cohort and its chunks, the packed stream lengths, and a memory check.

Everything here reads the config and raises :class:`ConfigError` on what cannot run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from fedlora_jax.config import Config, ConfigError, cohort_size
from fedlora_jax.data.base import FederatedData
from fedlora_jax.data.packing import eval_stream_length, row_lengths, token_buckets
from fedlora_jax.engine import Federation, RecordDP, StepStreams
from fedlora_jax.methods import streaming_methods
from fedlora_jax.models.gguf import is_gguf
from fedlora_jax.models.weights import resolve_checkpoint_dir
from fedlora_jax.params import leaf_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run lays out its work.

    devices: devices (of every process) the round runs on.
    model_devices: devices each client's model is split over (the mesh's ``model`` axis); the
      cohort's client axis is sharded over ``devices // model_devices`` groups.
    share: clients each group trains (the cohort padded to a multiple of the groups).
    clients_per_chunk: clients vmapped together (None: each device's whole share at once).
    streams: how the local steps pack their rows (:class:`fedlora_jax.engine.StepStreams`: stream
      length buckets, scored-token buckets of a causal LM, shared by a chunk's clients (encoders),
      aligned to the row length (the model asks for it)).
    bookkeeping: DP-SGD takes per-example gradients from one batched backward.
    eval_tokens / local_eval_tokens: packed stream lengths of the global / local evaluation
      batches (None: padded rows).
    """

    devices: int
    model_devices: int
    share: int
    clients_per_chunk: int | None
    streams: StepStreams
    bookkeeping: bool
    eval_tokens: int | None
    local_eval_tokens: int | None


def make_plan(config: Config, data: FederatedData, record_dp: RecordDP | None, routable: bool,
              aligned: bool, scores_from_hidden: bool = False) -> Plan:
    """The plan of a run of ``config`` on ``data``. ``routable``: every trainable leaf sits in a LoRA
    layer or linear head (per-client routing and DP bookkeeping apply); ``aligned``: the model
    wants streams aligned to its row length; ``scores_from_hidden``: a language model whose
    logits a loss can take at the scored positions only (``output_weight()``)."""
    f = config.federation
    bookkeeping = record_dp is not None and routable
    packs = config.data.packing == "auto" and (record_dp is None or bookkeeping)
    devices = mesh_devices(f.devices)
    check_model_devices(devices, f.model_devices)
    groups = devices // f.model_devices
    share = -(-cohort_size(config) // groups)  # clients each group trains (the cohort padded to a multiple)
    chunk = clients_per_chunk(config, data, packs, record_dp, share)
    group = min(chunk or share, data.num_clients)  # clients vmapped together
    # encoders share one stream between the group's clients; decoders keep one each (sharing is untried for them)
    shared = packs and routable and group > 1 and data.task != "causal_lm"
    scored = scores_from_hidden and data.task == "causal_lm"
    buckets, score_buckets = (step_token_buckets(data, f.batch_size, record_dp, group, shared, aligned, scored)
                              if packs else ((), ()))
    eval_tokens = local_tokens = None
    if config.data.packing == "auto" and data.task != "causal_lm":  # causal LM scores padded token rows
        eval_tokens = eval_stream_length(data.global_test["attention_mask"], config.eval.batch_size)
        local_tokens = eval_stream_length(data.local_test["attention_mask"], config.eval.batch_size)
    streams = StepStreams(buckets, score_buckets, shared and bool(buckets), aligned)
    return Plan(devices, f.model_devices, share, chunk, streams, bookkeeping, eval_tokens, local_tokens)


def step_rows(batch_size: int, record_dp: RecordDP | None) -> int:
    """Rows a local step computes: the static Poisson buffer under Poisson DP-SGD, else the batch."""
    return record_dp.buffer_size if record_dp is not None and record_dp.poisson else batch_size


def step_token_buckets(data: FederatedData, batch_size: int, record_dp: RecordDP | None, group: int,
                       shared: bool = False, aligned: bool = False,
                       scored: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Packed stream lengths for the local steps and (``scored``: a causal LM scoring its targets
    only) their scored-token counts (:func:`fedlora_jax.data.packing.token_buckets`)."""
    mask = data.train["attention_mask"]
    if np.any(np.diff(mask, axis=-1) > 0):
        raise ConfigError("config key 'data.packing': packing needs right-padded rows (a real prefix per row); "
                          "set data.packing=null")
    lengths = np.split(row_lengths(mask), np.cumsum(data.num_train)[:-1])
    client_scored = None
    if scored:
        targets = mask[:, 1:] * data.train.get("loss_mask", mask)[:, 1:]  # the next-token targets scored
        client_scored = np.split(targets.astype(bool).sum(axis=1), np.cumsum(data.num_train)[:-1])
    poisson = record_dp is not None and record_dp.poisson
    rates = np.minimum(1.0, batch_size / np.maximum(data.num_train, 1)) if poisson else None
    return token_buckets(
        lengths,
        step_rows(batch_size, record_dp),
        min(group, data.num_clients),
        mask.shape[-1],
        rates,
        shared=shared,
        aligned=aligned,
        client_scored=client_scored,
    )


CPU_CHUNK_TOKENS = 2048  # tokens per local step of a vmapped group of clients on a CPU (docs/performance.md)


def step_tokens(config: Config, data: FederatedData, packs: bool, record_dp: RecordDP | None) -> float:
    """Tokens one client's local step computes: its rows times their padded length, or their mean
    real length when packed."""
    mask = data.train["attention_mask"]
    length = float(row_lengths(mask).mean()) if packs else mask.shape[-1]
    return step_rows(config.federation.batch_size, record_dp) * length


def clients_per_chunk(config: Config, data: FederatedData, packs: bool, record_dp: RecordDP | None,
                      share: int) -> int | None:
    """``federation.clients_per_chunk`` with ``auto`` resolved.

    On accelerators ``auto`` is planned from the compiled round's memory once the federation
    exists (:func:`fedlora_jax.run.memory.planned_chunk`); here it stays None. On a CPU it vmaps groups of about
    :data:`CPU_CHUNK_TOKENS` tokens per local step (:func:`step_tokens` each), each device's
    ``share`` of the cohort (the clients it trains) split into that many even chunks: wider groups
    spill the step's working set out of cache (W1, 8 clients of 16 x 64 tokens: 1.2-1.35x faster in
    pairs than all 8 at once).
    """
    chunk = config.federation.clients_per_chunk
    if chunk != "auto":
        return chunk
    if jax.default_backend() != "cpu":
        return None
    chunk = max(1, int(CPU_CHUNK_TOKENS // max(step_tokens(config, data, packs, record_dp), 1.0)))
    if chunk >= share:
        return None
    return -(-share // -(-share // chunk))  # as many chunks as that needs, sized evenly


def cpu_device_count(cohort: int, cores: int, copy_bytes: int = 0, memory_bytes: int | None = None) -> int:
    """``federation.cpu_devices: auto``: CPU devices that train the cohort in shares side by side.

    The fewest devices that give the smallest share a device can have with one device per core
    (ceil(K / cores) clients; a cohort that does not divide is padded with empty slots), as long
    as their copies of the replicated state (``copy_bytes`` each: the base and the client rows)
    take at most a quarter of ``memory_bytes``; else the most that do."""
    share = -(-cohort // max(1, min(cores, cohort)))
    devices = -(-cohort // share)
    if memory_bytes is not None and copy_bytes > 0:
        devices = max(1, min(devices, int(memory_bytes / 4 // copy_bytes)))
    return devices


def host_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_memory() -> int:
    """The host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weight_file_bytes(config: Config) -> int:
    """Bytes of the pretrained checkpoint's weight files (0 for a model built from its config)."""
    if not config.model.pretrained:
        return 0
    if is_gguf(config.model.pretrained):
        return Path(config.model.pretrained).expanduser().stat().st_size
    folder = resolve_checkpoint_dir(config.model.pretrained)
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))


def cpu_devices_set_elsewhere() -> bool:
    """Whether something besides the config fixes JAX's CPU device count: ``jax_num_cpu_devices``,
    ``XLA_FLAGS``' ``--xla_force_host_platform_device_count``, or a multi-process run."""
    return (jax.distributed.is_initialized() or jax.config.jax_num_cpu_devices != -1
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""))


def split_cpu_cores(config: Config, data: FederatedData) -> None:
    """Applies ``federation.cpu_devices`` (JAX's CPU device count) if JAX has not started yet.

    ``null`` leaves the count to JAX. ``auto`` leaves a count set elsewhere alone
    (:func:`cpu_devices_set_elsewhere`) and otherwise takes :func:`cpu_device_count`; once JAX
    has started, it keeps the devices there are. A number must equal them then."""
    wanted = config.federation.cpu_devices
    if wanted is None or (wanted == "auto" and cpu_devices_set_elsewhere()):
        return
    explicit = wanted != "auto"
    if not explicit:
        rows = sum(x.nbytes for x in data.train.values())
        wanted = cpu_device_count(cohort_size(config), host_cores(), weight_file_bytes(config) + rows, host_memory())
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # JAX has started: its device count is fixed
        started = len(jax.devices("cpu"))
        if explicit and started != wanted:
            raise ConfigError(
                f"config key 'federation.cpu_devices' is {wanted} but JAX already started with {started} "
                f"CPU device(s) in this process; set it before anything else uses JAX, or to auto"
            ) from None


def mesh_devices(wanted: int | None) -> int:
    """``federation.devices``: all devices when None (of every process in a multi-process run,
    which must use them all); more than there are is an error."""
    available = jax.device_count()
    if wanted is not None and wanted > available:
        raise ConfigError(f"config key 'federation.devices' is {wanted} but this process sees {available} "
                          f"{jax.default_backend()} device(s)")
    if wanted is not None and wanted != available and jax.process_count() > 1:
        raise ConfigError(f"config key 'federation.devices' is {wanted} but a run of {jax.process_count()} processes "
                          f"shards its clients over all {available} devices; set it to null")
    return available if wanted is None else wanted


def check_model_devices(devices: int, model_devices: int) -> None:
    """Refuses a ``model`` axis that does not divide the mesh, or (several processes) that would
    span processes."""
    if devices % model_devices:
        raise ConfigError(f"config key 'federation.model_devices' is {model_devices}, which does not divide the "
                          f"{devices} device(s) of the mesh (devices = client groups x model devices)")
    local = jax.local_device_count()
    if jax.process_count() > 1 and local % model_devices:
        raise ConfigError(f"config key 'federation.model_devices' is {model_devices}, which does not divide the "
                          f"{local} device(s) of each process: a model group must not span processes")


def memory_available() -> int:
    """Bytes a round may use: the accelerator's memory limit, or the host's physical memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_cohort_fits(federation: Federation, params) -> None:
    """Refuses a round that stacks the whole cohort's trained states (two copies: the states and
    their per-module stacks) when they would take more than half the memory available."""
    if federation.streams:
        return
    need = 2 * federation.cohort_size * int(leaf_bytes(params).sum())
    available = memory_available()
    if need <= available / 2:
        return
    method = federation.method
    hint = (" or let it stream (federation.clients_per_chunk with eval.local: false)" if method.streaming else
            f" or use a streaming method ({', '.join(streaming_methods())})")
    raise ConfigError(f"method {method.name!r} aggregates the whole cohort at once: {federation.cohort_size} clients' "
                      f"trained states take {need / 2**30:.2f} GiB, more than half of the {available / 2**30:.2f} GiB "
                      f"available; lower federation.clients_per_round{hint}")
