"""``fedlora-jax export RUN_DIR --out OUT``: a run's trained adapter as a Hugging Face PEFT adapter.

:func:`export_run` reads the run directory (config.yaml, the newest checkpoint) and writes, with
:mod:`fedlora_jax.hf`,

* ``OUT/adapter_config.json`` and ``OUT/adapter_model.safetensors``: the LoRA adapter (and the
  task head under ``modules_to_save``; with ``pooling: mean`` a feature-extraction adapter plus
  ``OUT/head.safetensors``);
* ``OUT/base/`` (config.json + model.safetensors), a transformers checkpoint of the base, when
  the run's base is not a published checkpoint: a randomly initialised model, or a base the
  method rewrote (FedEx's residual, FLoRA's merged products). ``base_model_name_or_path`` points
  at it (relative to OUT) or at ``model.pretrained``. A run on a quantized base
  (``model.quantize``) exports the float base it quantized: its adapter is for that base;
* with ``clients=True``, for methods whose clients keep part of their model (FedSA),
  ``OUT/clients/<u>/``: client u's adapter (FedSA: shared A, its own B), the model client u
  starts its next round from.

An exported base loads back with ``model.pretrained`` and an adapter with ``model.adapter``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.engine import ServerState
from fedlora_jax.hf import save_adapter, save_base
from fedlora_jax.methods import make_method
from fedlora_jax.models import LoRAConfig, model_config_from_pretrained, split_model
from fedlora_jax.params import trainable_layout
from fedlora_jax.run.build import build_model, model_type_of
from fedlora_jax.run.checkpoint import Checkpointer, config_digest
from fedlora_jax.run.rundir import check_run_dir


class TaskInfo(NamedTuple):
    """What building the model needs from the data: the task and its number of labels."""

    task: str
    num_labels: int


def template_state(params, frozen, method, num_clients: int) -> ServerState:
    """A server state of the run's shapes to read a checkpoint into (only shapes and dtypes)."""
    method_state = jax.eval_shape(lambda p: method.init_state(p, trainable_layout(p), num_clients), params)
    return ServerState(params, frozen, np.zeros((), np.int32), jax.random.key(0), method_state)


def export_run(run_dir: str | Path, out_dir: str | Path, clients: bool = False) -> Path:
    """Writes the PEFT adapter of ``run_dir``'s newest checkpoint to ``out_dir`` (see the module).

    Raises:
      ConfigError: ``run_dir`` is no run directory or has no readable checkpoint, ``out_dir`` is
        not empty, or ``clients`` asks for per-client adapters of a method whose clients keep none.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_run_dir(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"export directory {out_dir} already exists and is not empty")
    config = load_config(run_dir / "config.yaml")
    method = make_method(config.federation.method, config.federation.method_options, lora_rank=config.lora.rank)
    checkpoints = Checkpointer(run_dir, config_digest(config.to_dict()), config.checkpoint.keep, method.modifies_base)
    meta = checkpoints.newest_meta()
    if meta is None:
        raise ConfigError(f"run directory {run_dir} has no checkpoint to export")
    task = TaskInfo(meta["task"], meta["num_labels"])
    # the float base, also of a run that trained on it quantized: the adapter is for the float base
    _, params, frozen = split_model(build_model(config, task, quantize=False)[0])
    found = checkpoints.latest(template_state(params, frozen, method, config.data.num_clients), lambda message: None)
    if found is None:
        raise ConfigError(f"run directory {run_dir} has no readable checkpoint to export")
    if clients and not method.keeps_client_state:
        raise ConfigError(f"--clients exports per-client adapters (FedSA); the clients of method {method.name!r} "
                          "keep no state of their own")
    state = jax.device_get(found.state)
    model_type, pooling = model_type_of(config.model), config.model.pooling
    lora = LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha, rslora=config.lora.rslora)

    base = config.model.pretrained
    if base is None or method.modifies_base:
        hf_config = model_config_from_pretrained(base) if base else dict(config.model.config)
        save_base(out_dir / "base", state.frozen, state.params, model_type, task.task, task.num_labels, hf_config,
                  pooling)
        base = "base"
    save_adapter(out_dir, state.params, model_type, task.task, lora, base, pooling)
    if clients:
        layout = trainable_layout(params)
        client_base = f"../../{base}" if base == "base" else base
        for u in range(config.data.num_clients):
            own_params = jax.tree.map(lambda x: np.asarray(x[0]), method.client_start(
                state.method_state, state.params, np.array([u]), layout))
            save_adapter(out_dir / "clients" / str(u), own_params, model_type, task.task, lora, client_base, pooling)
    return out_dir
