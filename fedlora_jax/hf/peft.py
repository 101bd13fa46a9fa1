"""Hugging Face PEFT adapters in and out: export a run's trained adapter (and its base when
needed); start a run from an existing adapter (``model.adapter``).

``export_run(RUN_DIR, OUT)`` reads the run's newest checkpoint and writes

* ``OUT/adapter_config.json`` and ``OUT/adapter_model.safetensors``: a LoRA adapter with PEFT's
  tensor names (``base_model.model.<module>.lora_A.weight`` [r, d_in], ``lora_B.weight``
  [d_out, r]), r, lora_alpha, use_rslora, the adapted modules by full name, and the task head
  under ``modules_to_save``;
* ``OUT/base/`` (config.json + model.safetensors), a transformers checkpoint of the base, when
  the run's base is not a published checkpoint: a randomly initialised model, or a base the
  method rewrote (FedEx's residual, FLoRA's merged products). ``base_model_name_or_path`` points
  at it (relative to OUT) or at ``model.pretrained``;
* with ``pooling: mean`` (no such head in transformers) a feature-extraction adapter on the bare
  encoder plus ``OUT/head.safetensors`` (``weight`` [num_labels, H], ``bias``) to apply to the
  masked mean of the last hidden states;
* with ``clients=True``, for methods whose clients keep part of their model (FedSA),
  ``OUT/clients/<u>/``: client u's adapter (FedSA: shared A, its own B), the model client u
  starts its next round from.

Names follow the same rules as loading (:mod:`fedlora_jax.models.weights`), so an exported base
loads back with ``model.pretrained``, and :func:`load_adapter` reads an adapter (ours or one PEFT
saved) into the initial trainable state by the same names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from fedlora_jax.run.checkpoint import Checkpointer, config_digest
from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.methods import make_method
from fedlora_jax.models.lora import split_model
from fedlora_jax.models.weights import _hf_module_path, hf_tensor_name, model_config_from_pretrained
from fedlora_jax.params import leaf_names, trainable_layout
from fedlora_jax.engine import ServerState

_BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "llama": "model.", "mistral": "model.", "qwen2": "model."}
_ARCHITECTURES = {("bert", "SEQ_CLS"): "BertForSequenceClassification",
                  ("roberta", "SEQ_CLS"): "RobertaForSequenceClassification",
                  ("bert", "FEATURE_EXTRACTION"): "BertModel", ("roberta", "FEATURE_EXTRACTION"): "RobertaModel",
                  ("llama", "CAUSAL_LM"): "LlamaForCausalLM", ("mistral", "CAUSAL_LM"): "MistralForCausalLM",
                  ("qwen2", "CAUSAL_LM"): "Qwen2ForCausalLM"}
LORA_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B"}


class TaskInfo(NamedTuple):
    """What building the model needs from the data: the task and its number of labels."""

    task: str
    num_labels: int


def template_state(params, frozen, method, num_clients: int) -> ServerState:
    """A server state of the run's shapes to read a checkpoint into (only shapes and dtypes)."""
    method_state = jax.eval_shape(lambda p: method.init_state(p, trainable_layout(p), num_clients), params)
    return ServerState(params, frozen, np.zeros((), np.int32), jax.random.key(0), method_state)


def _paths(tree) -> list[tuple[str, ...]]:
    return [tuple(str(p) for p in name.split(".")) for name in leaf_names(tree)]


class _Naming:
    """Our parameter paths -> names inside the transformers model the adapter is loaded onto."""

    def __init__(self, model_type: str, task_type: str):
        self.family = "llama" if model_type in ("llama", "mistral", "qwen2") else "bert"
        # a feature-extraction base is the bare encoder: its parameters carry no "bert." prefix
        self.prefix = "" if task_type == "FEATURE_EXTRACTION" else _BASE_PREFIX[model_type]

    def module(self, module_path: tuple[str, ...]) -> str:
        if module_path[0] == "head":
            return _hf_module_path(".".join(module_path), self.family)
        return self.prefix + _hf_module_path(".".join(module_path), self.family)

    def tensor(self, path: tuple[str, ...]) -> str:
        name = hf_tensor_name(path, self.family)
        return name if path[0] == "head" else self.prefix + name


def _torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T if path[-1] == "kernel" else value)


def export_run(run_dir: str | Path, out_dir: str | Path, clients: bool = False) -> Path:
    """Writes the PEFT adapter of ``run_dir``'s newest checkpoint to ``out_dir`` (see the module)."""
    from fedlora_jax.run import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"export directory {out_dir} already exists and is not empty")
    config = load_config(run_dir / "config.yaml")
    method = make_method(config.federation.method, config.federation.method_options, lora_rank=config.lora.rank)
    checkpoints = Checkpointer(run_dir, config_digest(config.to_dict()), config.checkpoint.keep, method.modifies_base)
    meta = checkpoints.newest_meta()
    if meta is None:
        raise ConfigError(f"run directory {run_dir} has no checkpoint to export")
    task = TaskInfo(meta["task"], meta["num_labels"])
    _, params, frozen = split_model(build_model(config, task)[0])
    found = checkpoints.latest(template_state(params, frozen, method, config.data.num_clients), lambda message: None)
    if found is None:
        raise ConfigError(f"run directory {run_dir} has no readable checkpoint to export")
    if clients and not method.keeps_client_state:
        raise ConfigError(f"--clients exports per-client adapters (FedSA); the clients of method {method.name!r} "
                          "keep no state of their own")
    state = jax.device_get(found.state)
    naming, model_type, task_type = _naming_for(config, task.task)
    tensors, targets, modules_to_save = _write_trainable(state.params, naming, task_type, out_dir)

    base = config.model.pretrained
    if base is None or method.modifies_base:
        _write_base(out_dir / "base", config, task, state, naming, model_type, task_type)
        base = "base"
    adapter = {"peft_type": "LORA", "task_type": task_type, "r": config.lora.rank, "lora_alpha": config.lora.alpha,
               "use_rslora": config.lora.rslora, "target_modules": sorted(set(targets)), "lora_dropout": 0.0,
               "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": modules_to_save or None,
               "base_model_name_or_path": str(base)}
    _write_adapter(_mkdir(out_dir), adapter, tensors)
    if clients:
        layout = trainable_layout(params)
        for u in range(config.data.num_clients):
            own_params = jax.tree.map(lambda x: np.asarray(x[0]), method.client_start(
                state.method_state, state.params, np.array([u]), layout))
            client_dir = out_dir / "clients" / str(u)
            own, _, _ = _write_trainable(own_params, naming, task_type, client_dir)
            _write_adapter(_mkdir(client_dir), {**adapter, "base_model_name_or_path": f"../../{base}"
                                                if base == "base" else base}, own)
    return out_dir


def _naming_for(config, task: str) -> tuple[_Naming, str, str]:
    """(naming, transformers model_type, PEFT task_type) of a config's model for ``task``."""
    model_type = (model_config_from_pretrained(config.model.pretrained)["model_type"] if config.model.pretrained
                  else config.model.arch)
    task_type = {"causal_lm": "CAUSAL_LM"}.get(task, "SEQ_CLS")
    if task_type == "SEQ_CLS" and config.model.pooling == "mean":
        task_type = "FEATURE_EXTRACTION"
    return _Naming(model_type, task_type), model_type, task_type


class _Place(NamedTuple):
    """Where a trainable leaf lives in an adapter directory."""

    file: str  # ADAPTER_FILE or HEAD_FILE
    name: str
    transposed: bool  # stored as torch's [out, in] while we hold [in, out]
    module: str | None  # the adapted module's name (LoRA factors), else None


ADAPTER_FILE, HEAD_FILE = "adapter_model.safetensors", "head.safetensors"


def _places(params, naming: _Naming, task_type: str) -> list[_Place]:
    """The place of every trainable leaf (in leaf order): LoRA factors and a transformers head in
    the adapter (PEFT names; the head under modules_to_save), a mean-pooling head in head.safetensors."""
    places = []
    for path in _paths(params):
        if path[-1] in LORA_LEAVES:
            module = naming.module(path[:-1])
            places.append(_Place(ADAPTER_FILE, f"base_model.model.{module}.{LORA_LEAVES[path[-1]]}.weight", False, module))
        elif task_type == "SEQ_CLS":
            places.append(_Place(ADAPTER_FILE, f"base_model.model.{naming.tensor(path)}", path[-1] == "kernel", None))
        else:
            places.append(_Place(HEAD_FILE, naming.tensor(path).split(".")[-1], path[-1] == "kernel", None))
    return places


def _write_trainable(params, naming: _Naming, task_type: str, out_dir: Path) -> tuple[dict, list, list]:
    """(adapter tensors by PEFT name, adapted module names, modules_to_save) of a trainable tree;
    a head outside the transformers model (mean pooling) goes to ``out_dir/head.safetensors``."""
    files = {ADAPTER_FILE: {}, HEAD_FILE: {}}
    places = _places(params, naming, task_type)
    for place, value in zip(places, jax.tree.leaves(params)):
        value = np.asarray(value)
        files[place.file][place.name] = np.ascontiguousarray(value.T if place.transposed else value)
    if files[HEAD_FILE]:
        save_file(files[HEAD_FILE], str(_mkdir(out_dir) / HEAD_FILE))
    targets = [p.module for p in places if p.module]
    modules_to_save = sorted({p.name.split(".")[2] for p in places if p.file == ADAPTER_FILE and not p.module})
    return files[ADAPTER_FILE], targets, modules_to_save


def load_adapter(path: str | Path, params, config, task: str):
    """``params`` (the trainable state: LoRA factors and head) with the values of the PEFT adapter
    in directory ``path``: every LoRA factor, and the head where the adapter saved one
    (``modules_to_save``, or ``head.safetensors`` with mean pooling).

    The adapter must match the run's LoRA setup: rank, alpha, rsLoRA and the adapted modules
    (``lora.targets``); anything else is a :class:`ConfigError` naming the difference.
    """
    path = Path(path)
    where = f"config key 'model.adapter': {path}"
    if not (path / "adapter_config.json").is_file() or not (path / ADAPTER_FILE).is_file():
        raise ConfigError(f"{where} is not a PEFT adapter directory (adapter_config.json + {ADAPTER_FILE})")
    try:
        adapter = json.loads((path / "adapter_config.json").read_text())
        files = {ADAPTER_FILE: load_file(str(path / ADAPTER_FILE))}
        if (path / HEAD_FILE).is_file():
            files[HEAD_FILE] = load_file(str(path / HEAD_FILE))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
    if adapter.get("peft_type") != "LORA":
        raise ConfigError(f"{where} is a {adapter.get('peft_type')} adapter; only LORA adapters can be loaded")
    for key, ours_value in (("r", config.lora.rank), ("lora_alpha", config.lora.alpha),
                            ("use_rslora", config.lora.rslora)):
        theirs = adapter.get(key, False if key == "use_rslora" else None)
        if theirs != ours_value:
            section = {"r": "rank", "lora_alpha": "alpha", "use_rslora": "rslora"}[key]
            raise ConfigError(f"{where} has {key}={theirs!r} but lora.{section} is {ours_value!r}; set lora.{section} to match")
    naming, _, task_type = _naming_for(config, task)
    places = _places(params, naming, task_type)
    adapted = {p.module for p in places if p.module}
    theirs = {k.rsplit(".", 2)[0] for k in files[ADAPTER_FILE] if ".lora_A." in k or ".lora_B." in k}
    extra = sorted(m.removeprefix("base_model.model.") for m in theirs - {f"base_model.model.{m}" for m in adapted})
    if extra:
        raise ConfigError(f"{where} adapts {extra[0]} (and {len(extra) - 1} more), which lora.targets do not adapt")
    found = [files.get(place.file, {}).get(place.name) for place in places]
    for place, value in zip(places, found):
        if value is None and place.module:
            raise ConfigError(f"{where} has no {place.name}: it does not adapt {place.module}, which lora.targets adapt")
    head_saved = [value is not None for place, value in zip(places, found) if not place.module]
    if any(head_saved) and not all(head_saved):
        raise ConfigError(f"{where} saves part of the task head only")
    leaves, treedef = jax.tree.flatten(params)
    for i, (place, value) in enumerate(zip(places, found)):
        if value is None:  # no head saved: the run's freshly initialised head
            continue
        value = value.T if place.transposed else value
        if value.shape != leaves[i].shape:
            raise ConfigError(f"{where}: {place.name} has shape {list(value.shape)}, the model needs {list(leaves[i].shape)}")
        leaves[i] = jnp.asarray(value, leaves[i].dtype)
    return jax.tree.unflatten(treedef, leaves)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_adapter(directory: Path, adapter: dict, tensors: dict) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def _write_base(directory: Path, config, task: "TaskInfo", state, naming: _Naming, model_type: str,
                task_type: str) -> None:
    """A transformers checkpoint of the base the adapter applies to (the frozen weights the run
    ends with, and for a classifier its final head)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if config.model.pretrained:
        hf_config = model_config_from_pretrained(config.model.pretrained)
    else:
        hf_config = dict(config.model.config)
    hf_config.update(model_type=model_type, architectures=[_ARCHITECTURES[(model_type, task_type)]])
    tensors = {naming.tensor(p): _torch_layout(p, np.asarray(v))
               for p, v in zip(_paths(state.frozen), jax.tree.leaves(state.frozen))}
    if task_type == "SEQ_CLS":
        hf_config["num_labels"] = task.num_labels if task.task != "regression" else 1
        hf_config.pop("id2label", None), hf_config.pop("label2id", None)
        if task.task == "regression":
            hf_config["problem_type"] = "regression"
        tensors.update({naming.tensor(p): _torch_layout(p, np.asarray(v))
                        for p, v in zip(_paths(state.params), jax.tree.leaves(state.params)) if p[-1] not in LORA_LEAVES})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
