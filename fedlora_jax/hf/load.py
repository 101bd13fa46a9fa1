"""Reading a PEFT LoRA adapter (ours or one PEFT saved) into a trainable state, by the names
:mod:`fedlora_jax.hf.naming` gives its leaves."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from safetensors.numpy import load_file

from fedlora_jax.hf.naming import ADAPTER_FILE, HEAD_FILE, AdapterError, Naming, places
from fedlora_jax.models.lora import LoRAConfig

_LORA_KEYS = (("r", "rank"), ("lora_alpha", "alpha"), ("use_rslora", "rslora"))  # adapter_config key, LoRAConfig field


def _read(path: Path, where: str) -> tuple[dict, dict[str, dict]]:
    """(adapter_config.json, tensors by file) of an adapter directory."""
    if not (path / "adapter_config.json").is_file() or not (path / ADAPTER_FILE).is_file():
        raise AdapterError(f"{where} is not a PEFT adapter directory (adapter_config.json + {ADAPTER_FILE})")
    try:
        adapter = json.loads((path / "adapter_config.json").read_text())
        files = {ADAPTER_FILE: load_file(str(path / ADAPTER_FILE))}
        if (path / HEAD_FILE).is_file():
            files[HEAD_FILE] = load_file(str(path / HEAD_FILE))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
    return adapter, files


def load_adapter(path: str | Path, params, model_type: str, task: str, lora: LoRAConfig, pooling: str = "cls"):
    """``params`` with the values of the PEFT adapter in directory ``path``: every LoRA factor, and
    the task head where the adapter saved one (``modules_to_save``, or ``head.safetensors`` with
    mean pooling); a head it did not save keeps its values in ``params``.

    Args:
      path: the adapter directory (adapter_config.json + adapter_model.safetensors).
      params: the trainable state of the model the adapter is read into (LoRA factors and head).
      model_type: the model's model_type (a key of the model registry).
      task: the model's task; with ``pooling`` it sets the names (see :mod:`fedlora_jax.hf.naming`).
      lora: the model's rank, alpha and rsLoRA, which the adapter must match.
      pooling: "cls" or "mean".

    Returns:
      A trainable state of ``params``' structure and dtypes.

    Raises:
      AdapterError: the directory is no LoRA adapter, or it differs from the model in rank, alpha,
        rsLoRA, the adapted modules (those ``params`` holds factors of) or a tensor's shape.
    """
    path = Path(path)
    where = f"adapter {path}"
    adapter, files = _read(path, where)
    if adapter.get("peft_type") != "LORA":
        raise AdapterError(f"{where} is a {adapter.get('peft_type')} adapter; only LORA adapters can be loaded")
    for key, field in _LORA_KEYS:
        theirs, ours = adapter.get(key, False if key == "use_rslora" else None), getattr(lora, field)
        if theirs != ours:
            raise AdapterError(f"{where} has {key}={theirs!r} but lora.{field} is {ours!r}; set lora.{field} to match")
    found_places = places(params, Naming(model_type, task, pooling))
    adapted = {f"base_model.model.{p.module}" for p in found_places if p.module}
    theirs = {k.rsplit(".", 2)[0] for k in files[ADAPTER_FILE] if ".lora_A." in k or ".lora_B." in k}
    extra = sorted(m.removeprefix("base_model.model.") for m in theirs - adapted)
    if extra:
        raise AdapterError(f"{where} adapts {extra[0]} (and {len(extra) - 1} more), which lora.targets do not adapt")
    found = [files.get(place.file, {}).get(place.name) for place in found_places]
    for place, value in zip(found_places, found):
        if value is None and place.module:
            raise AdapterError(f"{where} has no {place.name}: it does not adapt {place.module}, "
                               "which lora.targets adapt")
    head_saved = [value is not None for place, value in zip(found_places, found) if not place.module]
    if any(head_saved) and not all(head_saved):
        raise AdapterError(f"{where} saves part of the task head only")
    leaves, treedef = jax.tree.flatten(params)
    for i, (place, value) in enumerate(zip(found_places, found)):
        if value is None:  # no head saved: the model's own head
            continue
        value = value.T if place.transposed else value
        if value.shape != leaves[i].shape:
            raise AdapterError(f"{where}: {place.name} has shape {list(value.shape)}, the model needs "
                               f"{list(leaves[i].shape)}")
        leaves[i] = jnp.asarray(value, leaves[i].dtype)
    return jax.tree.unflatten(treedef, leaves)
