"""The run loop: build everything from a config, run rounds, evaluate, log, summarise.

Python runs only between rounds. Everything that can fail on bad input (config, data, model)
is built before the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedlora_jax import models
from fedlora_jax.run.checkpoint import Checkpointer, config_digest
from fedlora_jax.engine.client import LocalTrainer, RecordDP, make_optimizer, make_schedule
from fedlora_jax.config import Config, ConfigError, cohort_size
from fedlora_jax.data.base import FederatedData, offsets_of
from fedlora_jax.data.packing import eval_stream_length, row_lengths, token_buckets
from fedlora_jax.data.sources import SOURCES, load_federated
from fedlora_jax.data.synthetic import make_synthetic
from fedlora_jax.run.distributed import is_primary
from fedlora_jax.eval.evaluate import (Evaluator, client_eval_batches, client_rows, eval_batch_count, eval_batches, pad_rows,
                                  score, unbatch, weighted_client_metrics)
from fedlora_jax.eval.generate import gsm8k_exact_match
from fedlora_jax.hf import load_adapter
from fedlora_jax.run.export import model_type_of
from fedlora_jax.methods import make_method, streaming_methods
from fedlora_jax.models.lora import LoRAConfig, inject_lora, split_model
from fedlora_jax.models.weights import resolve_checkpoint_dir
from fedlora_jax.params import leaf_bytes, leaf_names, trainable_layout
from fedlora_jax.privacy.bookkeeping import unsupported_leaves
from fedlora_jax.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedlora_jax.engine.round import ClientShards, Federation, ServerState, UserDP, device_shards, init_server_state


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built and validated from a config."""

    config: Config
    data: FederatedData
    graphdef: Any
    params: Any
    frozen: Any
    federation: Federation
    evaluator: Evaluator
    lora_modules: list[str]
    ledger: PrivacyLedger


def build_data(config: Config) -> FederatedData:
    d = config.data
    if d.source == "synthetic":
        if d.partition != {"scheme": "iid"}:
            raise ConfigError("config key 'data.partition' does not apply to data.source=synthetic, which draws its "
                              "own split (data.examples_per_client, data.label_skew_alpha); remove it or use a real source")
        return make_synthetic(
            num_clients=d.num_clients, examples_per_client=tuple(d.examples_per_client), vocab_size=d.vocab_size,
            seq_len=d.seq_len, num_labels=d.num_labels, label_skew_alpha=d.label_skew_alpha,
            signal_tokens=d.signal_tokens, test_examples=d.test_examples,
            local_test_fraction=d.local_test_fraction, seed=config.seed)
    if d.source not in SOURCES:
        raise ConfigError(f"config key 'data.source': unknown source {d.source!r} (known: {', '.join(SOURCES)})")
    tokenizer = d.tokenizer or config.model.pretrained
    if not tokenizer:
        raise ConfigError("config key 'data.tokenizer' is needed when model.pretrained is not set")
    return load_federated(d.source, d.load, tokenizer, d.num_clients, d.partition, config.seed, d.max_length,
                          d.train_split, d.test_split, d.local_test_fraction, d.max_train_examples,
                          d.max_test_examples, d.cache_dir, d.eos_token, d.test_max_length)


def lora_config(config: Config) -> LoRAConfig:
    c = config.lora
    return LoRAConfig(rank=c.rank, alpha=c.alpha, targets=tuple(c.targets) if c.targets else None, rslora=c.rslora)


def build_model(config: Config, data: FederatedData):
    """The model with LoRA injected; returns (model, adapted module paths)."""
    m = config.model
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    num_labels = 1 if data.task == "regression" else data.num_labels
    kwargs = {"pooling": m.pooling} if data.task != "causal_lm" else {}
    if m.pretrained:
        model = models.load_pretrained(m.pretrained, task=data.task, num_labels=num_labels, dtype=dtype,
                                       seed=config.seed, **kwargs)
    else:
        model = models.create_model(m.arch, dict(m.config), task=data.task, num_labels=num_labels,
                                    seed=config.seed, dtype=dtype, **kwargs)
    adapted = inject_lora(model, lora_config(config), jax.random.key(config.seed + 1))
    return model, adapted


def step_rows(batch_size: int, record_dp: RecordDP | None) -> int:
    """Rows a local step computes: the static Poisson buffer under Poisson DP-SGD, else the batch."""
    return record_dp.buffer_size if record_dp is not None and record_dp.poisson else batch_size


def step_token_buckets(data: FederatedData, batch_size: int, record_dp: RecordDP | None, group: int,
                       shared: bool = False, aligned: bool = False) -> tuple[int, ...]:
    """Packed stream lengths for the local steps (:func:`fedlora_jax.data.packing.token_buckets`)."""
    mask = data.train["attention_mask"]
    if np.any(np.diff(mask, axis=-1) > 0):
        raise ConfigError("config key 'data.packing': packing needs right-padded rows (a real prefix per row); "
                          "set data.packing=null")
    lengths = np.split(row_lengths(mask), np.cumsum(data.num_train)[:-1])
    poisson = record_dp is not None and record_dp.poisson
    rates = np.minimum(1.0, batch_size / np.maximum(data.num_train, 1)) if poisson else None
    return token_buckets(lengths, step_rows(batch_size, record_dp), min(group, data.num_clients), mask.shape[-1], rates, shared=shared, aligned=aligned)


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

    On accelerators ``auto`` trains the whole cohort at once. On a CPU it vmaps groups of about
    :data:`CPU_CHUNK_TOKENS` tokens per local step (:func:`step_tokens` each), each device's
    ``share`` of the cohort (the clients it trains) split into that many even chunks: wider groups spill the step's working set out
    of cache (W1, 8 clients of 16 x 64 tokens: 1.2-1.35x faster in pairs than all 8 at once).
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
            raise ConfigError(f"config key 'federation.cpu_devices' is {wanted} but JAX already started with {started} "
                              f"CPU device(s) in this process; set it before anything else uses JAX, or to auto") from None


def build_experiment(config: Config, data: FederatedData | None = None) -> Experiment:
    """Builds data, model, local trainer and federation; raises on bad input, writes nothing."""
    data = data if data is not None else build_data(config)
    if config.eval.generate_examples and data.generation is None:
        raise ConfigError("config key 'eval.generate_examples' needs a data source with prompts (gsm8k)")
    if data.num_clients != config.data.num_clients:
        raise ConfigError(f"data has {data.num_clients} clients but data.num_clients is {config.data.num_clients}")
    split_cpu_cores(config, data)  # before the model starts JAX
    model, adapted = build_model(config, data)
    graphdef, params, frozen = split_model(model)
    if config.model.adapter:
        params = load_adapter(config.model.adapter, params, model_type_of(config.model), data.task, lora_config(config),
                              config.model.pooling)
    f, p = config.federation, config.privacy
    ledger = PrivacyLedger.create(p, data.num_train, f.batch_size, f.local_steps, f.rounds, cohort_size(config))
    record_dp = None
    if p.record_level:
        record_dp = RecordDP(p.clip_norm, ledger.noise_multiplier, p.per_layer_clipping, p.sampling == "poisson",
                             ledger.record_buffer)
    user_dp = UserDP(p.user_clip_norm, ledger.user_noise_multiplier) if p.user_level else None
    poisson_cohorts = p.user_level and p.client_sampling == "poisson"
    routable = not unsupported_leaves(graphdef, params, frozen)  # every trainable leaf in a LoRA layer or linear head
    bookkeeping = record_dp is not None and routable
    packs = config.data.packing == "auto" and (record_dp is None or bookkeeping)
    devices = mesh_devices(f.devices)
    share = -(-cohort_size(config) // devices)  # clients each device trains (the cohort padded to a multiple)
    chunk = clients_per_chunk(config, data, packs, record_dp, share)
    group = min(chunk or share, data.num_clients)  # clients vmapped together
    # encoders share one stream between the group's clients; decoders (token-level heads, T x T attention) do not
    shared = packs and routable and group > 1 and data.task != "causal_lm"
    aligned = getattr(model, "aligned_packing", False)
    buckets = step_token_buckets(data, f.batch_size, record_dp, group, shared, aligned) if packs else ()
    trainer = LocalTrainer(graphdef, data.task, make_optimizer(config.optim),
                           make_schedule(config.optim, f.rounds * f.local_steps), f.local_steps, f.batch_size, record_dp,
                           buckets, bookkeeping, shared and bool(buckets), aligned, int(data.num_train.max()))
    method = make_method(f.method, f.method_options, lora_rank=config.lora.rank)
    layout = trainable_layout(params)
    frozen_index = {name: i for i, name in enumerate(leaf_names(frozen))}
    base_kernels = tuple(frozen_index[m.name + ".kernel"] for m in layout.modules)
    federation = Federation(trainer, method, layout, ledger.cohort_slots, data.num_clients, chunk,
                            user_dp, lora_config(config).scaling, base_kernels,
                            cohort_size(config) / data.num_clients if poisson_cohorts else None,
                            keep_client_params=config.eval.local, devices=devices,
                            uniform_weights=f.client_weights == "uniform")
    check_cohort_fits(federation, params)
    eval_tokens = local_tokens = None
    if config.data.packing == "auto" and data.task != "causal_lm":  # causal LM scores padded token rows
        eval_tokens = eval_stream_length(data.global_test["attention_mask"], config.eval.batch_size)
        local_tokens = eval_stream_length(data.local_test["attention_mask"], config.eval.batch_size)
    evaluator = Evaluator(graphdef, data.task, config.eval.batch_size, eval_tokens, local_tokens)
    return Experiment(config, data, graphdef, params, frozen, federation, evaluator, adapted, ledger)


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


class RunLog:
    """The run directory: resolved config, metrics.jsonl, divergence.jsonl, summary.json.

    A new run needs an empty or absent directory; a resumed one (``resume``) needs the run's own
    directory with its config.yaml. Without ``writes`` (the other processes of a multi-process
    run) it only reads."""

    def __init__(self, out_dir: Path | None, config: Config, resume: bool = False, writes: bool = True):
        self.dir, self.writes = out_dir, writes
        if out_dir is None:
            if resume:
                raise ConfigError("resuming needs the run directory")
            return
        if not writes and not resume:
            return
        if resume:
            if not (out_dir / "config.yaml").is_file():
                raise ConfigError(f"{out_dir} is not a run directory (no config.yaml)")
            return
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ConfigError(f"run directory {out_dir} already exists and is not empty")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        for name in ("metrics.jsonl", "divergence.jsonl"):  # present even when no round is logged
            (out_dir / name).touch()

    def append(self, filename: str, record: dict) -> None:
        if self.dir is not None and self.writes:
            with open(self.dir / filename, "a") as fh:
                fh.write(json.dumps(record, allow_nan=False) + "\n")  # NaN is not JSON

    def round(self, record: dict) -> None:
        """Logs a round: its metrics (``record`` less ``"modules"``) and its per-module divergence."""
        self.append("metrics.jsonl", {k: v for k, v in record.items() if k != "modules"})
        self.append("divergence.jsonl", {"round": record["round"], **record["modules"]})

    def write(self, filename: str, record: dict) -> None:
        if self.dir is not None and self.writes:
            (self.dir / filename).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")

    def truncate(self, rounds: int) -> list[dict]:
        """Keeps the records of rounds 1..``rounds`` in the per-round logs (atomically, each
        file); returns the metrics.jsonl records kept."""
        kept = {}
        for name in ("metrics.jsonl", "divergence.jsonl"):
            path = self.dir / name
            lines = path.read_text().splitlines() if path.exists() else []
            records = [json.loads(line) for line in lines if line.strip()]
            kept[name] = [r for r in records if r["round"] <= rounds]
            if [r["round"] for r in kept[name]] != list(range(1, rounds + 1)):
                raise ConfigError(f"{path} does not hold rounds 1..{rounds} of the checkpoint")
            if not self.writes:
                continue
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept[name]))
            os.replace(tmp, path)
        return kept["metrics.jsonl"]


@dataclasses.dataclass
class RunResult:
    history: list[dict]
    state: ServerState
    experiment: Experiment
    out_dir: Path | None
    compile_s: float
    diverged: str | None = None  # why the run stopped on a non-finite value, if it did
    interrupted: bool = False  # Ctrl-C stopped it (after a round, with a checkpoint)


class Evaluation:
    """Host-side wrapper of the jitted evaluators with the test batches prepared once."""

    def __init__(self, exp: Experiment):
        ev, devices = exp.evaluator, exp.federation.devices
        self.exp = exp
        self.global_fn, self.local_fn = ev.compile(exp.federation.mesh if devices > 1 else None)
        self.global_arrays = exp.data.global_test
        self.global_n = len(next(iter(self.global_arrays.values())))
        batches, index = eval_batches(self.global_arrays, ev.batch_size, ev.num_tokens)
        # the batch axis is shared out over the devices: padded with empty batches to a multiple
        self.global_index = np.pad(index, ((0, -index.shape[0] % devices), (0, 0)), constant_values=-1)
        self.global_batches = jax.tree.map(jnp.asarray, pad_rows(batches, devices))
        self.local_arrays, self.local_sizes = local_subsets(exp.data, exp.config.eval.local_max_examples, exp.config.seed)
        self.local_offsets = offsets_of(self.local_sizes)
        self.local_batches: dict = {}  # client id -> its local test batches, built on first use
        # every cohort's local batches have the same static count: the most any client needs
        most = max(eval_batch_count(client_rows(self.local_arrays, self.local_offsets, self.local_sizes,
                                            u)["attention_mask"], ev.batch_size, ev.local_num_tokens)
                   for u in range(exp.data.num_clients))
        self.local_num_batches = -(-most // devices) * devices

    def global_metrics(self, state: ServerState) -> dict:
        preds, losses = jax.device_get(self.global_fn(state.params, state.frozen, self.global_batches))
        preds, losses = unbatch(preds, self.global_index, self.global_n), unbatch(losses, self.global_index, self.global_n)
        valid = np.ones(self.global_n, bool)
        out = score(self.exp.data.name, self.exp.data.task, preds, losses, self.global_arrays, valid)
        generation, cfg = self.exp.data.generation, self.exp.config.eval
        if generation is not None and cfg.generate_examples:
            n = min(cfg.generate_examples, len(generation.prompts))
            out["exact_match"], _ = gsm8k_exact_match(
                self.exp.graphdef, state.params, state.frozen, generation.tokenizer, generation.prompts[:n],
                generation.references[:n], cfg.max_prompt_length, cfg.max_new_tokens, cfg.batch_size,
                generation.eos_token)
        return out

    def metrics(self, state: ServerState, client_base, client_params, cohort: np.ndarray, taking_part: np.ndarray,
                headline: str) -> dict:
        """The evaluation fields of a round's record: ``global_*`` (the new global model),
        ``local_*`` (each cohort client's trained factors on ``client_base``, the base it
        trained on), the local-global gap of the headline metric and ``eval_s``."""
        t_eval = time.perf_counter()
        record = {f"global_{k}": v for k, v in self.global_metrics(state).items()}
        if self.exp.config.eval.local:
            record.update({f"local_{k}": v for k, v in self.local_metrics(client_base, client_params, cohort,
                                                                          taking_part).items()})
            if f"local_{headline}" in record:
                record["local_global_gap"] = record[f"local_{headline}"] - record[f"global_{headline}"]
        record["eval_s"] = time.perf_counter() - t_eval
        return record

    def local_metrics(self, frozen, client_params, cohort: np.ndarray, taking_part: np.ndarray | None = None) -> dict:
        """Each cohort client's trained model (``client_params`` [K, ...] leaves on the base
        ``frozen``) on its own local test rows, weighted by their counts; slots with
        ``taking_part`` False (empty Poisson-cohort slots) weigh 0."""
        sizes = self.local_sizes[cohort] * (1 if taking_part is None else taking_part)
        if sizes.sum() == 0:
            return {}
        batches, index = client_eval_batches(self.local_arrays, self.local_offsets, self.local_sizes, cohort,
                                             self.exp.evaluator.batch_size, self.exp.evaluator.local_num_tokens,
                                             self.local_num_batches, self.local_batches)
        preds, losses = jax.device_get(self.local_fn(client_params, frozen, jax.tree.map(jnp.asarray, batches)))
        per_client = []
        for i, (u, n) in enumerate(zip(cohort, sizes)):
            if not n:
                per_client.append({})
                continue
            client = client_rows(self.local_arrays, self.local_offsets, self.local_sizes, u)
            kept = int(self.local_sizes[u])
            client_preds, client_losses = unbatch(preds[i], index[i], kept), unbatch(losses[i], index[i], kept)
            per_client.append(score(self.exp.data.name, self.exp.data.task, client_preds, client_losses, client,
                                    np.ones(kept, bool)))
        return weighted_client_metrics(per_client, sizes)


def local_subsets(data: FederatedData, limit: int | None, seed: int) -> tuple[dict, np.ndarray]:
    """Each client's local test rows, at most ``limit`` of them (a seeded random subset, kept in
    order): arrays [M, ...] client after client, and the kept counts [U]."""
    counts = data.num_local_test
    rng = np.random.default_rng(seed)
    kept = counts if limit is None else np.minimum(counts, limit)
    offsets = data.local_test_offsets
    rows = [offsets[u] + np.sort(rng.choice(int(n), size=int(kept[u]), replace=False))
            for u, n in enumerate(counts) if n]
    order = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return {k: v[order] for k, v in data.local_test.items()}, np.asarray(kept)


def _headline(task: str) -> str:
    return {"causal_lm": "token_accuracy", "regression": "pearson"}.get(task, "accuracy")


def run(config: Config, out_dir: str | Path | None = None, progress: bool = True,
        console: Console | None = None, experiment: Experiment | None = None, resume: bool = False) -> RunResult:
    """Runs a federated simulation; writes the run directory when ``out_dir`` is given.

    With ``resume`` the run directory must hold an earlier run of ``config``: it continues from
    the newest usable checkpoint. Ctrl-C stops after the current round with a checkpoint. In a
    multi-process run every process calls this; process 0 alone writes and shows progress.
    """
    exp = experiment or build_experiment(config)
    console = console or Console(stderr=True)
    fed, rounds = exp.federation, config.federation.rounds
    primary = is_primary()
    progress = progress and primary
    log = RunLog(Path(out_dir) if out_dir is not None else None, config, resume, writes=primary)
    checkpoints = (Checkpointer(log.dir, config_digest(config.to_dict()), config.checkpoint.keep,
                                fed.method.modifies_base, {"task": exp.data.task, "num_labels": exp.data.num_labels})
                   if log.dir is not None else None)
    shards: ClientShards = fed.replicated(device_shards(exp.data))
    state = init_server_state(exp.params, exp.frozen, config.seed, fed)  # placed on the mesh
    history: list[dict] = []
    if resume:
        state, history = restore(checkpoints, state, exp.ledger, log, console if primary else Console(quiet=True))
        state = fed.replicated(state)
    compiled, compile_s = compile_round(fed, state, shards)
    evaluation = Evaluation(exp)
    headline = _headline(exp.data.task)
    stopped = diverged = None
    with RoundProgress(console, progress, f"{config.name} [{fed.method.name}]", rounds, len(history), compile_s,
                       headline) as bar, InterruptFlag() as interrupted:
        for r in range(len(history), rounds):
            stopped = budget_stop(exp.ledger, fed, state)
            if stopped:
                break
            state, record, diverged = play_round(exp, compiled, state, shards, evaluation, r, headline)
            if diverged:
                break
            history.append(record)
            log.round(record)
            bar.advance(record)
            if checkpoints and primary and config.checkpoint.every and (r + 1) % config.checkpoint.every == 0:
                checkpoints.save(state, exp.ledger.participations, exp.ledger.rounds_done)
            if interrupted():
                stopped = f"interrupted after round {r + 1}; continue with: fedlora-jax resume {log.dir or 'RUN_DIR'}"
                break
    for message, style in ((stopped, "yellow"), (diverged, "red")):
        if message and primary:
            console.print(f"[{style}]{message}[/{style}]", soft_wrap=True)
    if checkpoints and primary:  # the state the run ends with (the last good one after a divergence)
        checkpoints.save(state, exp.ledger.participations, exp.ledger.rounds_done)
    summary = summarise(history, headline, compile_s, exp.ledger, stopped, diverged)
    summary["devices"] = f"{fed.devices} x {jax.default_backend()}"  # the mesh the rounds ran on
    log.write("summary.json", summary)
    if progress:
        console.print(summary_table(summary, title=f"{config.name}: {fed.method.name}, {rounds} rounds"))
    return RunResult(history, state, exp, log.dir, compile_s, diverged, interrupted())


def play_round(exp: Experiment, compiled, state: ServerState, shards: ClientShards, evaluation: "Evaluation",
               r: int, headline: str) -> tuple[ServerState, dict, str | None]:
    """Round r (0-based): (the new state, its metrics record with the per-module divergence
    under ``"modules"``, None), or (the last good state, {}, why it diverged)."""
    fed, config = exp.federation, exp.config
    evaluate = (r + 1) % config.eval.every == 0 or r + 1 == config.federation.rounds
    # clients trained on the base before the round; FedEx and FLoRA rewrite it (and the round
    # consumes the old buffers), so their local evaluation needs a copy
    base_before = (jax.tree.map(jnp.copy, state.frozen)
                   if evaluate and config.eval.local and fed.method.modifies_base else None)
    t_round = time.perf_counter()
    state, out = compiled(state, shards)
    train_loss, wall_s = float(out.train_loss), time.perf_counter() - t_round
    cohort, taking_part = np.asarray(out.cohort), np.asarray(out.cohort_mask)
    privacy = exp.ledger.commit(cohort[taking_part])  # the round ran: its privacy cost is spent
    diverged = non_finite(np.asarray(out.finite), state, fed.method.modifies_base, r)
    if diverged:
        return state, {}, diverged
    record = round_record(exp, state, out, r, train_loss, wall_s, privacy)
    if evaluate:
        client_base = state.frozen if base_before is None else base_before
        record.update(evaluation.metrics(state, client_base, out.client_params, cohort, taking_part, headline))
    record["modules"] = dict(zip([m.name for m in fed.layout.modules], map(float, np.asarray(out.divergence))))
    return state, record, None


def compile_round(fed: Federation, state: ServerState, shards: ClientShards):
    """(the compiled round, seconds it took to compile)."""
    t0 = time.perf_counter()
    compiled = fed.compile_round().lower(state, shards).compile()
    return compiled, time.perf_counter() - t0


def restore(checkpoints: Checkpointer, template: ServerState, ledger: PrivacyLedger, log: RunLog,
            console: Console) -> tuple[ServerState, list[dict]]:
    """The newest usable checkpoint's state; the ledger set to it; the logged rounds after it
    removed from the run directory (they run again). Returns (state, history so far)."""
    found = checkpoints.latest(template, lambda message: console.print(f"[yellow]{message}[/yellow]", soft_wrap=True))
    if found is None:
        raise ConfigError(f"run directory {log.dir} has no usable checkpoint to resume from")
    ledger.participations[:] = found.participations
    ledger.rounds_done = found.rounds_spent
    history = log.truncate(found.round)
    console.print(f"resuming {log.dir} after round {found.round} ({found.path.name})", soft_wrap=True)
    return found.state, history


def budget_stop(ledger: PrivacyLedger, fed: Federation, state: ServerState) -> str | None:
    """Why the next round must not run (its privacy cost would exceed a target), or None."""
    if not ledger.active:
        return None
    try:
        ledger.check(fed.next_cohort(state))
    except BudgetExceeded as e:
        return str(e)
    return None


def round_record(exp: Experiment, state: ServerState, out, r: int, train_loss: float, wall_s: float,
                 privacy: dict) -> dict:
    """The metrics.jsonl record of round r (0-based) before evaluation."""
    fed, taking_part = exp.federation, np.asarray(out.cohort_mask)
    bytes_up, bytes_down = fed.communication_bytes(state.params, state.frozen, r, int(taking_part.sum()))
    divergence = np.asarray(out.divergence)
    record = {"round": r + 1, "train_loss": train_loss, "divergence": float(divergence.mean()) if divergence.size else 0.0,
              "wall_s": wall_s, "bytes_up": bytes_up, "bytes_down": bytes_down}
    if fed.client_sampling_rate is not None:
        record.update(cohort_size=int(taking_part.sum()), cohort_overflow=bool(out.cohort_overflow))
    record.update(privacy)
    dp = fed.trainer.dp
    if dp is not None:
        record["dp_non_finite_examples"] = int(out.dp_non_finite)
        if dp.poisson:
            record["dp_buffer_overflows"] = int(out.dp_overflows)
    return record


class RoundProgress:
    """The progress bar of a run (disabled when ``progress`` is False)."""

    def __init__(self, console: Console, progress: bool, description: str, rounds: int, done: int,
                 compile_s: float, headline: str):
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=console, disable=not progress, transient=False)
        self.task = self.bar.add_task(description, total=rounds, completed=done, status="compiled in %.1fs" % compile_s)
        self.headline = headline

    def __enter__(self) -> "RoundProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, record: dict) -> None:
        status = f"loss {record['train_loss']:.4f}"
        if f"global_{self.headline}" in record:
            status += f"  {self.headline} {record[f'global_{self.headline}']:.4f}"
        self.bar.update(self.task, advance=1, status=status)


class InterruptFlag:
    """Within the block, the first Ctrl-C (SIGINT) only sets a flag, read by calling the object;
    a second one interrupts as usual. Outside the main thread it never fires."""

    def __init__(self):
        self.fired, self.previous = False, None

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.fired:
            raise KeyboardInterrupt
        self.fired = True

    def __call__(self) -> bool:
        return self.fired

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def non_finite(finite: np.ndarray, state: ServerState, check_frozen: bool, r: int) -> str | None:
    """The divergence message of round r (0-based) from the round's finite flags (the training
    loss, then each trainable leaf, then each frozen leaf when the method writes the base), or None."""
    if finite.all():
        return None
    names = (["the training loss"] + [f"trainable parameter {n}" for n in leaf_names(state.params)]
             + ([f"frozen parameter {n}" for n in leaf_names(state.frozen)] if check_frozen else []))
    what = names[int(np.argmin(finite))]
    return (f"round {r + 1}: {what} is not finite (NaN or inf); the run stopped and keeps the state "
            f"after round {r}")


def summarise(history: list[dict], headline: str, compile_s: float, ledger: PrivacyLedger | None = None,
              stopped: str | None = None, diverged: str | None = None) -> dict:
    """Final and best values of the evaluated metrics, totals of bytes and time; the noise that
    ran, why the run stopped early and, after a divergence, the privacy spent (the discarded
    round ran and counts)."""
    out = summarise_history(history, headline, compile_s)
    if ledger is not None:
        out.update({k: v for k, v in (("noise_multiplier", ledger.noise_multiplier),
                                      ("user_noise_multiplier", ledger.user_noise_multiplier)) if v is not None})
    if stopped:
        out["stopped"] = stopped
    if diverged:
        out["diverged"] = diverged
        if ledger is not None:
            out.update({f"spent_{k}": v for k, v in ledger.report().items()})
    return out


def summarise_history(history: list[dict], headline: str, compile_s: float) -> dict:
    """Final and best values of the evaluated metrics, totals of bytes and time."""
    if not history:
        return {"rounds": 0, "compile_s": compile_s}
    evaluated = [h for h in history if f"global_{headline}" in h]
    last = evaluated[-1] if evaluated else history[-1]
    out = {"rounds": len(history), "final_train_loss": history[-1]["train_loss"]}
    for key in sorted(k for k in last if k.startswith(("global_", "local_"))):
        out[f"final_{key}"] = last[key]
    if evaluated:
        out[f"best_global_{headline}"] = max(h[f"global_{headline}"] for h in evaluated)
    for key in ("epsilon", "delta", "user_epsilon", "user_delta"):
        if key in history[-1]:
            out[f"final_{key}"] = history[-1][key]
    out["total_bytes_up"] = int(sum(h["bytes_up"] for h in history))
    out["total_bytes_down"] = int(sum(h["bytes_down"] for h in history))
    out["mean_divergence"] = float(np.mean([h["divergence"] for h in history]))
    out["compile_s"] = compile_s
    out["train_s"] = float(sum(h["wall_s"] for h in history))
    return out


def summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) else v if isinstance(v, str) else f"{v:.4f}")
    return table
