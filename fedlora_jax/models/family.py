"""The record a model family fills in for each ``model_type`` it serves (one row of
:data:`fedlora_jax.models.registry.FAMILIES`): how to build its NNX models from a Hugging Face
config, and how their parameters are named in Hugging Face checkpoints and PEFT adapters.

Naming, from an NNX parameter path to a transformers tensor name (the rules loading and PEFT
export share):
  * the attribute that holds the base model inside a task model (``base_module``: ``bert``,
    ``model``) is dropped;
  * the module path is rewritten by the first of ``module_rules`` that matches it whole (when
    none does, the path is already the transformers one);
  * leaves: Linear ``kernel`` [in, out] <- ``weight`` [out, in] transposed; Embed ``embedding``
    and norm ``scale`` <- ``weight``; ``bias`` <- ``bias``.
That gives the name inside the bare transformers base model. A transformers task model holds its
base under ``base_prefix`` (``bert.``, ``roberta.``, ``model.``): checkpoint names lose it
(:meth:`Family.checkpoint_name`), and PEFT names of the base's parameters gain it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}

# build(config, *, num_labels, pooling, dtype, rngs) -> the NNX model of one task
Builder = Callable[..., nnx.Module]
# config -> {separate projection: (fused projection, first row, number of rows)}
FusedProjections = Callable[[Any], Mapping[str, tuple[str, int, int]]]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` is built, loaded and exported.

    Attributes:
      config_from_hf: a Hugging Face ``config.json`` dict (its ``model_type`` set) -> the
        family's config object (what the builders take).
      builders: task ("classification", "regression", "causal_lm", "encoder") -> a function
        ``build(config, *, num_labels, pooling, dtype, rngs)`` returning the NNX model. Tasks
        absent here are not available for this model_type.
      base_module: the attribute of a task model that holds the base model (``bert``, ``model``).
      base_prefix: the prefix of the base model's tensors in transformers task models
        (``bert.``, ``roberta.``, ``model.``).
      architectures: PEFT task type (``SEQ_CLS``, ``FEATURE_EXTRACTION``, ``CAUSAL_LM``) -> the
        transformers class an exported base checkpoint declares.
      module_rules: (NNX module path regex, transformers module path replacement) pairs; the
        first that matches a path whole rewrites it.
      legacy_names: (regex, replacement) pairs applied to checkpoint tensor names (old spellings).
      fused_projections: config -> which separate projections a checkpoint may store fused
        (``qkv_proj``), as row blocks of the fused tensor; None when the family has none.
    """

    config_from_hf: Callable[[Mapping[str, Any]], Any]
    builders: Mapping[str, Builder]
    base_module: str
    base_prefix: str
    architectures: Mapping[str, str]
    module_rules: tuple[tuple[str, str], ...] = ()
    legacy_names: tuple[tuple[str, str], ...] = ()
    fused_projections: FusedProjections | None = None

    def in_base(self, path: tuple[str, ...]) -> bool:
        """Whether an NNX path lies inside the base model (not a task head or ``lm_head``)."""
        return bool(path) and str(path[0]) == self.base_module

    def module_name(self, module_path: str) -> str:
        """The transformers name (inside the bare base model) of a dotted NNX module path."""
        module_path = module_path.removeprefix(self.base_module + ".")
        for pattern, replacement in self.module_rules:
            if re.fullmatch(pattern, module_path):
                return re.sub(pattern, replacement, module_path)
        return module_path

    def tensor_name(self, path: tuple) -> str:
        """The transformers name (inside the bare base model) of an NNX parameter path, e.g.
        ``("bert", "pooler", "kernel")`` -> ``pooler.dense.weight``."""
        *module, leaf = (str(p) for p in path)
        if leaf not in LEAF_NAMES:
            raise ValueError(f"no checkpoint naming rule for parameter leaf {leaf!r} at {'.'.join(module)}")
        return f"{self.module_name('.'.join(module))}.{LEAF_NAMES[leaf]}"

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor name as :meth:`tensor_name` spells it: without ``base_prefix``, old
        spellings renamed."""
        name = name.removeprefix(self.base_prefix)
        for pattern, replacement in self.legacy_names:
            name = re.sub(pattern, replacement, name)
        return name
