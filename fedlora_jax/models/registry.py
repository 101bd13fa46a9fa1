"""The one table of model families: a transformers ``model_type`` -> its :class:`Family` row.

Loading (:func:`fedlora_jax.models.load_pretrained`), random initialisation
(:func:`fedlora_jax.models.create_model`) and PEFT adapters in and out (:mod:`fedlora_jax.hf`)
all look a model_type up here and nowhere else. A family lives in its own folder
(``models/<family>/``: config, modeling, params); its ``params.py`` defines its rows, and each row
is one line below (docs/models.md walks through adding one).
"""

from __future__ import annotations

from fedlora_jax.models import bert, llama
from fedlora_jax.models.family import Builder, Family

TASKS = ("classification", "regression", "causal_lm", "encoder")

FAMILIES: dict[str, Family] = {
    "bert": bert.BERT,
    "roberta": bert.ROBERTA,
    "llama": llama.LLAMA,
    "mistral": llama.MISTRAL,
    "qwen2": llama.QWEN2,
}


def family_of(model_type: str) -> Family:
    """The registry row of ``model_type``; ``ValueError`` when no family serves it."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {tuple(FAMILIES)}")
    return FAMILIES[model_type]


def builder_of(model_type: str, task: str) -> tuple[Family, Builder]:
    """(registry row, model builder) of a model_type/task pair; ``ValueError`` naming what is
    available when the pair is not."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    family = family_of(model_type)
    if task not in family.builders:
        raise ValueError(f"task {task!r} is not available for model_type {model_type!r}; "
                         f"available: {tuple(family.builders)}")
    return family, family.builders[task]
