"""Writing PEFT adapters and transformers base checkpoints from trainable and frozen states.

:func:`save_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors``: a LoRA
adapter with PEFT's tensor names (``base_model.model.<module>.lora_A.weight`` [r, d_in],
``lora_B.weight`` [d_out, r]), r, lora_alpha, use_rslora, the adapted modules by full name, and a
transformers task head under ``modules_to_save``; with mean pooling (no such head in
transformers) the head goes to ``head.safetensors`` (``weight`` [num_labels, H], ``bias``) beside
a feature-extraction adapter. :func:`save_base` writes a transformers checkpoint (config.json +
model.safetensors) of the base the adapter applies to, named as loading reads it, so it loads
back with :func:`fedlora_jax.models.load_pretrained` as well as with transformers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from fedlora_jax.hf.naming import ADAPTER_FILE, HEAD_FILE, LORA_LEAVES, Naming, paths, places
from fedlora_jax.models.lora import LoRAConfig


def save_adapter(directory: str | Path, params, model_type: str, task: str, lora: LoRAConfig, base: str,
                 pooling: str = "cls") -> Path:
    """Writes the PEFT LoRA adapter of a trainable state into ``directory`` (created).

    Args:
      directory: where the adapter goes.
      params: the trainable state (LoRA factors and task head), host or device arrays.
      model_type: the base's model_type (a key of the model registry).
      task: the model's task; with ``pooling`` it sets PEFT's task type.
      lora: rank, alpha and rsLoRA of the factors (its targets are not read: the adapted modules
        are those ``params`` holds factors of).
      base: ``base_model_name_or_path``, the base the adapter applies to.
      pooling: "cls" or "mean" (a feature-extraction adapter plus ``head.safetensors``).

    Returns:
      ``directory``.
    """
    directory = Path(directory)
    naming = Naming(model_type, task, pooling)
    files = {ADAPTER_FILE: {}, HEAD_FILE: {}}
    found = places(params, naming)
    for place, value in zip(found, jax.tree.leaves(params)):
        value = np.asarray(value)
        files[place.file][place.name] = np.ascontiguousarray(value.T if place.transposed else value)
    directory.mkdir(parents=True, exist_ok=True)
    if files[HEAD_FILE]:
        save_file(files[HEAD_FILE], str(directory / HEAD_FILE))
    modules_to_save = sorted({p.name.split(".")[2] for p in found if p.file == ADAPTER_FILE and not p.module})
    adapter = {"peft_type": "LORA", "task_type": naming.task_type, "r": lora.rank, "lora_alpha": lora.alpha,
               "use_rslora": lora.rslora, "target_modules": sorted({p.module for p in found if p.module}),
               "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
               "modules_to_save": modules_to_save or None, "base_model_name_or_path": str(base)}
    (directory / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
    save_file(files[ADAPTER_FILE], str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    return directory


def _torch_layout(path: tuple[str, ...], value) -> np.ndarray:
    value = np.asarray(value)
    return np.ascontiguousarray(value.T if path[-1] == "kernel" else value)


def save_base(directory: str | Path, frozen, params, model_type: str, task: str, num_labels: int,
              hf_config: Mapping[str, Any], pooling: str = "cls") -> Path:
    """Writes a transformers checkpoint of the base an adapter applies to: the frozen weights and,
    for a sequence classifier, its task head (the non-LoRA leaves of ``params``).

    Args:
      directory: the checkpoint directory (replaced whole once written; nothing half-written).
      frozen: the frozen state.
      params: the trainable state.
      model_type: the base's model_type.
      task: the model's task ("classification", "regression", "causal_lm").
      num_labels: classes of a classifier (regression: 1 is written).
      hf_config: the Hugging Face ``config.json`` keys of the model (architecture and task keys
        are set here).
      pooling: "cls" or "mean" (then the bare encoder is written).

    Returns:
      ``directory``.
    """
    directory = Path(directory)
    naming = Naming(model_type, task, pooling)
    config = {**hf_config, "model_type": model_type, "architectures": [naming.architecture()]}
    tensors = {naming.tensor(p): _torch_layout(p, v) for p, v in zip(paths(frozen), jax.tree.leaves(frozen))}
    if naming.task_type == "SEQ_CLS":
        config["num_labels"] = 1 if task == "regression" else num_labels
        config.pop("id2label", None), config.pop("label2id", None)
        if task == "regression":
            config["problem_type"] = "regression"
        tensors.update({naming.tensor(p): _torch_layout(p, v) for p, v in zip(paths(params), jax.tree.leaves(params))
                        if p[-1] not in LORA_LEAVES})
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory
