"""Hugging Face checkpoints (config.json + safetensors) -> NNX models, by naming rules.

Only ``*.safetensors`` are read (never pickle ``.bin``, never remote code). Tensors are streamed
one at a time with ``safetensors.safe_open(..., framework="numpy")``; bfloat16 tensors come back
as ``ml_dtypes.bfloat16`` numpy arrays (ml_dtypes, a JAX dependency, registers that dtype with
numpy once imported) and are cast to the requested dtype.

Naming rules, from an NNX parameter path to a checkpoint tensor name:
  * checkpoint names lose one leading ``bert.``, ``roberta.`` or ``model.``; legacy LayerNorm
    ``gamma``/``beta`` read as ``weight``/``bias``;
  * NNX module paths map to HF module paths (:data:`BERT_MODULE_RULES`; Llama names are HF's);
  * leaves: Linear ``kernel`` [in, out] <- ``weight`` [out, in] transposed; Embed
    ``embedding`` and norm ``scale`` <- ``weight``; ``bias`` <- ``bias``;
  * fused ``qkv_proj`` / ``gate_up_proj`` tensors are split by rows when the separate ones
    are absent.
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

from fedlora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from fedlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)

TASKS = ("classification", "regression", "causal_lm", "encoder")
ENCODER_TYPES = ("bert", "roberta")
DECODER_TYPES = ("llama", "mistral", "qwen2")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "vocab*", "merges.txt", "*.model"]
CHECKPOINT_PREFIXES = ("bert.", "roberta.", "model.")
HEAD = "head"

# NNX module path (dotted, without the wrapper's ``bert.``) -> HF module path.
BERT_MODULE_RULES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.layer_norm", r"embeddings.LayerNorm"),
    (r"layers\.(\d+)\.attention\.(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
    (r"layers\.(\d+)\.attention_output", r"encoder.layer.\1.attention.output.dense"),
    (r"layers\.(\d+)\.attention_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"layers\.(\d+)\.intermediate", r"encoder.layer.\1.intermediate.dense"),
    (r"layers\.(\d+)\.output", r"encoder.layer.\1.output.dense"),
    (r"layers\.(\d+)\.output_norm", r"encoder.layer.\1.output.LayerNorm"),
    (r"pooler", r"pooler.dense"),
    (r"head", r"classifier"),
    (r"head\.(dense|out_proj)", r"classifier.\1"),
)
LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# separate projection -> (fused checkpoint projection, index of its row block)
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


# ----------------------------------------------------------------------------- model building


def _architecture(model_type: str, config: Mapping[str, Any], task: str, num_labels: int, dtype, pooling: str = "cls"):
    """(model constructor taking rngs, family) for a model_type/task pair."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if model_type in ENCODER_TYPES:
        bert_config = BertConfig.from_hf({**config, "model_type": model_type})
        if task == "encoder":
            return (lambda rngs: BertModel(bert_config, dtype=dtype, param_dtype=dtype, rngs=rngs)), "bert"
        if task in ("classification", "regression"):
            labels = 1 if task == "regression" else num_labels
            return (
                lambda rngs: BertForSequenceClassification(
                    bert_config, labels, head=model_type, pooling=pooling, dtype=dtype, param_dtype=dtype, rngs=rngs
                )
            ), "bert"
    elif model_type in DECODER_TYPES:
        llama_config = LlamaConfig.from_hf({**config, "model_type": model_type})
        if task == "causal_lm":
            return (lambda rngs: LlamaForCausalLM(llama_config, dtype=dtype, param_dtype=dtype, rngs=rngs)), "llama"
    else:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {ENCODER_TYPES + DECODER_TYPES}")
    available = ("encoder", "classification", "regression") if model_type in ENCODER_TYPES else ("causal_lm",)
    raise ValueError(f"task {task!r} is not available for model_type {model_type!r}; available: {available}")


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
      model_type: "bert", "roberta", "llama", "mistral" or "qwen2".
      config: HF ``config.json`` keys (vocab_size, hidden_size, num_hidden_layers, ...).
      task: "classification", "regression" (1 output), "encoder" (bert/roberta: hidden states)
        or "causal_lm" (llama family).
      num_labels: outputs of the classification head.
      seed: initialisation seed.
      dtype: parameter and compute dtype.
      pooling: sequence classification: "cls" (HF's head) or "mean" (see
        :class:`~fedlora_jax.models.bert.BertForSequenceClassification`).
    """
    build, _ = _architecture(model_type, config, task, num_labels, dtype, pooling)
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
    """The Hugging Face ``config.json`` dict of a local directory or hub repo."""
    return _read_config(resolve_checkpoint_dir(path_or_hub_id))


def _normalise_name(name: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if "LayerNorm." in name:
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    return name


def _checkpoint_index(directory: Path) -> dict[str, tuple[Path, str]]:
    """Normalised tensor name -> (safetensors file, name in that file)."""
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
    return {_normalise_name(name): (file, name) for file, name in entries}


# ----------------------------------------------------------------------------- name mapping


def _hf_module_path(module_path: str, family: str) -> str:
    if family == "llama":
        return module_path.removeprefix("model.")
    module_path = module_path.removeprefix("bert.")
    for pattern, replacement in BERT_MODULE_RULES:
        if re.fullmatch(pattern, module_path):
            return re.sub(pattern, replacement, module_path)
    return module_path


def hf_tensor_name(path: tuple, family: str) -> str:
    """The normalised checkpoint name of an NNX parameter path (e.g. ``("bert", "pooler", "kernel")``)."""
    *module, leaf = (str(p) for p in path)
    if leaf not in LEAF_NAMES:
        raise ValueError(f"no checkpoint naming rule for parameter leaf {leaf!r} at {'.'.join(module)}")
    return f"{_hf_module_path('.'.join(module), family)}.{LEAF_NAMES[leaf]}"


def _fused_block_sizes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Row-block sizes of fused projections, from the HF config (decoders only)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    inner = config["intermediate_size"]
    return {"qkv_proj": (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), "gate_up_proj": (inner, inner)}


class _TensorSource:
    """Finds and reads checkpoint tensors by normalised name, splitting fused projections."""

    def __init__(self, index: dict[str, tuple[Path, str]], block_sizes: dict[str, tuple[int, ...]], stack):
        self.index = index
        self.block_sizes = block_sizes
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
        if match is None or match.group(2) not in FUSED_PROJECTIONS or not self.block_sizes:
            return None
        fused, block = FUSED_PROJECTIONS[match.group(2)]
        fused_name = f"{match.group(1)}.{fused}.{match.group(3)}"
        if fused_name not in self.index:
            return None
        sizes = self.block_sizes[fused]
        start = sum(sizes[:block])
        return lambda: self._slice(fused_name)[start : start + sizes[block]]


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
        model.safetensors.index.json, or not), or a hub repo id (downloaded when not a directory).
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
    directory = resolve_checkpoint_dir(path_or_hub_id)
    config = _read_config(directory)
    model_type = config.get("model_type")
    build, family = _architecture(model_type, config, task, num_labels, dtype, pooling)
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    index = _checkpoint_index(directory)
    block_sizes = _fused_block_sizes(config) if family == "llama" else {}

    loaded, missing_head = [], []
    with contextlib.ExitStack() as stack:
        source = _TensorSource(index, block_sizes, stack)
        for path, variable in nnx.to_flat_state(abstract_state):
            expected = variable.get_value()
            name = hf_tensor_name(path, family)
            read = source.find(name)
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
    logger.debug("loaded %d parameters from %d checkpoint tensors in %s", len(loaded), len(index), directory)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
