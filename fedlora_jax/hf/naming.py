"""Where each trainable leaf goes in a PEFT adapter directory, by the same naming rules as loading
(the model_type's row of :data:`fedlora_jax.models.registry.FAMILIES`).

An adapter applies to a transformers model: for ``SEQ_CLS`` and ``CAUSAL_LM`` the task model,
whose base parameters carry the family's ``base_prefix`` (``bert.``, ``model.``); for
``FEATURE_EXTRACTION`` (mean pooling: transformers has no such head) the bare base model.
"""

from __future__ import annotations

from typing import NamedTuple

from fedlora_jax.models.registry import family_of
from fedlora_jax.params import leaf_names

ADAPTER_FILE, HEAD_FILE = "adapter_model.safetensors", "head.safetensors"
LORA_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B"}


class AdapterError(ValueError):
    """A PEFT adapter that cannot be read, written or applied, reported as one line."""


def peft_task_type(task: str, pooling: str = "cls") -> str:
    """PEFT's task type of a model: ``CAUSAL_LM``, ``SEQ_CLS``, or ``FEATURE_EXTRACTION`` for the
    bare encoder (task ``encoder``, or a sequence head on mean-pooled states)."""
    if task == "causal_lm":
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION" if task == "encoder" or pooling == "mean" else "SEQ_CLS"


class Naming:
    """Our parameter paths -> names inside the transformers model an adapter applies to.

    Args:
      model_type: a key of the model registry.
      task: the model's task ("classification", "regression", "causal_lm", "encoder").
      pooling: "cls" or "mean" (sequence tasks).
    """

    def __init__(self, model_type: str, task: str, pooling: str = "cls"):
        self.model_type, self.task = model_type, task
        self.family = family_of(model_type)
        self.task_type = peft_task_type(task, pooling)
        self.prefix = "" if self.task_type == "FEATURE_EXTRACTION" else self.family.base_prefix

    def module(self, module_path: tuple[str, ...]) -> str:
        """The transformers name of a module (e.g. a LoRA-adapted linear layer)."""
        name = self.family.module_name(".".join(module_path))
        return self.prefix + name if self.family.in_base(module_path) else name

    def tensor(self, path: tuple[str, ...]) -> str:
        """The transformers name of a parameter."""
        name = self.family.tensor_name(path)
        return self.prefix + name if self.family.in_base(path) else name

    def architecture(self) -> str:
        """The transformers class of the model the adapter applies to."""
        if self.task_type not in self.family.architectures:
            raise AdapterError(f"model_type {self.model_type!r} has no transformers class for PEFT task type "
                               f"{self.task_type} (it has {sorted(self.family.architectures)})")
        return self.family.architectures[self.task_type]


class Place(NamedTuple):
    """Where a trainable leaf lives in an adapter directory."""

    file: str  # ADAPTER_FILE or HEAD_FILE
    name: str
    transposed: bool  # stored as torch's [out, in] while we hold [in, out]
    module: str | None  # the adapted module's name (LoRA factors), else None


def paths(tree) -> list[tuple[str, ...]]:
    """The parameter paths of a state's leaves, in leaf order."""
    return [tuple(name.split(".")) for name in leaf_names(tree)]


def places(params, naming: Naming) -> list[Place]:
    """The place of every trainable leaf (in leaf order): LoRA factors and a transformers head in
    the adapter (PEFT names; the head under modules_to_save), a mean-pooling head in head.safetensors."""
    found = []
    for path in paths(params):
        if path[-1] in LORA_LEAVES:
            module = naming.module(path[:-1])
            name = f"base_model.model.{module}.{LORA_LEAVES[path[-1]]}.weight"
            found.append(Place(ADAPTER_FILE, name, False, module))
        elif naming.task_type == "SEQ_CLS":
            found.append(Place(ADAPTER_FILE, f"base_model.model.{naming.tensor(path)}", path[-1] == "kernel", None))
        else:
            found.append(Place(HEAD_FILE, naming.tensor(path).split(".")[-1], path[-1] == "kernel", None))
    return found
