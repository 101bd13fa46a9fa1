"""Hugging Face checkpoints (config.json + safetensors) -> NNX models, by naming rules.

Only ``*.safetensors`` are read (never pickle ``.bin``, never remote code). Tensors are streamed
one at a time with ``safetensors.safe_open(..., framework="numpy")``; bfloat16 tensors come back
as ``ml_dtypes.bfloat16`` numpy arrays (ml_dtypes, a JAX dependency, registers that dtype with
numpy once imported) and are cast to the requested dtype.

Names: each model_type's row of :data:`fedlora_jax.models.registry.FAMILIES` says how its
parameters are named in checkpoints (:mod:`fedlora_jax.models.family`); fused projections are
split by rows when the separate ones are absent. This module knows no family.

Checkpoint tensors no parameter needs are ignored. A task ``head`` missing from the checkpoint
is freshly initialised (logged); any other missing or mis-shaped tensor raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return it)
import numpy as np
from flax import nnx
from safetensors import safe_open

from fedlora_jax.models.family import Family
from fedlora_jax.models.gguf import is_gguf, read_gguf
from fedlora_jax.models.registry import builder_of, family_of

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "vocab*", "merges.txt", "*.model"]
HEAD = "head"


# ----------------------------------------------------------------------------- model building


def _model_builder(model_type: str, hf_config: Mapping[str, Any], task: str, num_labels: int, dtype,
                   pooling: str) -> tuple[Family, Any, Callable[[nnx.Rngs], nnx.Module]]:
    """(registry row, family config, build(rngs) -> model) of a model_type/task pair."""
    family, build = builder_of(model_type, task)
    config = family.config_from_hf({**hf_config, "model_type": model_type})
    labels = 1 if task == "regression" else num_labels
    return family, config, lambda rngs: build(config, num_labels=labels, pooling=pooling, dtype=dtype, rngs=rngs)


def create_model(
    model_type: str,
    config: Mapping[str, Any],
    task: str,
    num_labels: int = 2,
    seed: int = 0,
    dtype=jnp.float32,
    pooling: str = "cls",
) -> nnx.Module:
    """Builds a randomly initialised model from a config dict with Hugging Face key names.

    Args:
      model_type: a key of :data:`~fedlora_jax.models.registry.FAMILIES` ("bert", "roberta",
        "llama", "mistral", "qwen2").
      config: HF ``config.json`` keys (vocab_size, hidden_size, num_hidden_layers, ...).
      task: "classification", "regression" (1 output), "encoder" (bert/roberta: hidden states)
        or "causal_lm" (llama family); the model_type's row says which it has.
      num_labels: outputs of the classification head.
      seed: initialisation seed.
      dtype: parameter and compute dtype.
      pooling: sequence classification: "cls" (HF's head) or "mean" (see
        :class:`~fedlora_jax.models.bert.BertForSequenceClassification`).
    """
    _, _, build = _model_builder(model_type, config, task, num_labels, dtype, pooling)
    return build(nnx.Rngs(seed))


# ----------------------------------------------------------------------------- checkpoint files


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory: the argument itself, or a hub snapshot of it.

    Anything that is not an existing directory is treated as a Hugging Face hub repo id and
    fetched with ``huggingface_hub.snapshot_download`` (config, tokenizer and safetensors only).
    """
    text = os.fspath(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise ValueError(f"model path {text!r} is not a directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, invalid id: all surface as one clear error
        raise ValueError(
            f"{text!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {err})"
        ) from err


def _read_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in {directory}")
    return json.loads(config_file.read_text())


def model_config_from_pretrained(path_or_hub_id: str | os.PathLike) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a local directory or hub repo (of a ``.gguf``
    file: the one its metadata gives)."""
    if is_gguf(path_or_hub_id):
        return read_gguf(path_or_hub_id)[0]
    return _read_config(resolve_checkpoint_dir(path_or_hub_id))


def _checkpoint_index(directory: Path, family: Family) -> dict[str, tuple[Path, str]]:
    """Tensor name as ``family`` spells it (:meth:`Family.checkpoint_name`) -> (safetensors file,
    name in that file)."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        entries = [(directory / file, name) for name, file in weight_map.items()]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors in {directory} (pickle .bin checkpoints are not loaded)")
        entries = []
        for file in files:
            with safe_open(file, framework="numpy") as handle:
                entries.extend((file, name) for name in handle.keys())  # noqa: SIM118 (safe_open is not iterable)
    return {family.checkpoint_name(name): (file, name) for file, name in entries}


# ----------------------------------------------------------------------------- name mapping


def hf_tensor_name(path: tuple, model_type: str) -> str:
    """The checkpoint name (inside the bare base model) of an NNX parameter path of a
    ``model_type`` model, e.g. ``("bert", "pooler", "kernel")`` -> ``pooler.dense.weight``."""
    return family_of(model_type).tensor_name(path)


class _TensorSource:
    """Finds and reads checkpoint tensors by normalised name, splitting fused projections."""

    def __init__(self, index: dict[str, tuple[Path, str]], fused: Mapping[str, tuple[str, int, int]], stack):
        self.index = index
        self.fused = fused
        self.stack = stack
        self.handles: dict[Path, Any] = {}

    def _slice(self, name: str):
        file, original = self.index[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(safe_open(file, framework="numpy"))
        return self.handles[file].get_slice(original)

    def find(self, name: str) -> Callable[[], np.ndarray] | None:
        """A reader of the tensor ``name`` (None when the checkpoint lacks it)."""
        if name in self.index:
            return lambda: self._slice(name)[:]
        match = re.fullmatch(r"(.*)\.(\w+)\.(weight|bias)", name)
        if match is None or match.group(2) not in self.fused:
            return None
        fused, start, rows = self.fused[match.group(2)]
        fused_name = f"{match.group(1)}.{fused}.{match.group(3)}"
        if fused_name not in self.index:
            return None
        return lambda: self._slice(fused_name)[start : start + rows]


def _checkpoint_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The checkpoint (PyTorch) shape of a parameter: Linear weights are [out, in]."""
    return tuple(reversed(shape)) if leaf == "kernel" else tuple(shape)


# ----------------------------------------------------------------------------- loading


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    task: str = "classification",
    num_labels: int = 2,
    dtype=jnp.float32,
    seed: int = 0,
    pooling: str = "cls",
) -> nnx.Module:
    """Loads a Hugging Face safetensors checkpoint into the matching NNX model.

    Args:
      path_or_hub_id: a local directory with config.json and *.safetensors (sharded with
        model.safetensors.index.json, or not), a hub repo id (downloaded when not a directory),
        or a ``.gguf`` file of a Llama decoder (dequantized; :mod:`fedlora_jax.models.gguf`).
      task: "classification", "regression", "encoder" (bert/roberta) or "causal_lm" (llama family).
      num_labels: outputs of the classification head (regression: always 1).
      dtype: parameter and compute dtype.
      seed: seed of parameters the checkpoint lacks (only the task head may be missing).
      pooling: sequence classification: "cls" (HF's head on the first token) or "mean" (masked
        mean of the last hidden states; what sentence-transformers checkpoints are trained for).

    Returns:
      The model with checkpoint weights.

    Raises:
      ValueError: unsupported model_type/task, no safetensors, or a missing/mis-shaped tensor.
    """
    gguf_tensors = None
    if is_gguf(path_or_hub_id):
        directory = Path(path_or_hub_id)
        config, gguf_tensors = read_gguf(directory)
    else:
        directory = resolve_checkpoint_dir(path_or_hub_id)
        config = _read_config(directory)
    family, family_config, build = _model_builder(config.get("model_type"), config, task, num_labels, dtype, pooling)
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    if gguf_tensors is None:
        index = _checkpoint_index(directory, family)
        fused = family.fused_projections(family_config) if family.fused_projections else {}

    loaded, missing_head = [], []
    with contextlib.ExitStack() as stack:
        find = ({family.checkpoint_name(n): read for n, read in gguf_tensors.items()}.get if gguf_tensors is not None
                else _TensorSource(index, fused, stack).find)
        for path, variable in nnx.to_flat_state(abstract_state):
            expected = variable.get_value()
            name = family.tensor_name(path)
            read = find(name)
            if read is None:
                if HEAD in path:
                    missing_head.append((path, variable))
                    continue
                raise ValueError(
                    f"checkpoint {directory} has no tensor {name!r} for parameter {'.'.join(map(str, path))}"
                )
            array = read()
            leaf = str(path[-1])
            wanted = _checkpoint_shape(expected.shape, leaf)
            if tuple(array.shape) != wanted:
                hint = " (num_labels differs from the checkpoint's head)" if HEAD in path else ""
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(array.shape)} but parameter "
                    f"{'.'.join(map(str, path))} needs {wanted}{hint}"
                )
            if leaf == "kernel":
                array = array.T
            loaded.append((path, variable.replace(jnp.asarray(array, dtype=expected.dtype))))
    if missing_head:
        names = ", ".join(".".join(map(str, p)) for p, _ in missing_head)
        logger.info("checkpoint %s has no task head (%s): initialised freshly with seed %d", directory, names, seed)
        fresh = nnx.to_flat_state(jax.jit(lambda: nnx.state(build(nnx.Rngs(seed)), nnx.PathContains(HEAD)))())
        fresh_values = dict(fresh)
        loaded.extend((path, variable.replace(fresh_values[path].get_value())) for path, variable in missing_head)
    logger.debug("loaded %d parameters from %s", len(loaded), directory)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
