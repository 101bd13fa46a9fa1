"""The BERT family's rows of the registry (``bert``, ``roberta``): its models per task and the
Hugging Face names of its parameters, which loading and PEFT export share (see
:mod:`fedlora_jax.models.family` for how the rules apply)."""

from __future__ import annotations

import dataclasses

from fedlora_jax.models.bert.config import BertConfig
from fedlora_jax.models.bert.modeling import BertForSequenceClassification, BertModel
from fedlora_jax.models.family import Builder, Family

# NNX module path (without the task model's ``bert.``) -> transformers module path
MODULE_RULES: tuple[tuple[str, str], ...] = (
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
# old checkpoints name LayerNorm parameters gamma and beta
LEGACY_NAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))


def _builders(head: str) -> dict[str, Builder]:
    """The models of each task, with the sequence head of transformers' ``head`` classifier."""

    def encoder(config: BertConfig, *, num_labels, pooling, dtype, rngs):
        return BertModel(config, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def sequence(config: BertConfig, *, num_labels, pooling, dtype, rngs):
        return BertForSequenceClassification(config, num_labels, head=head, pooling=pooling, dtype=dtype,
                                             param_dtype=dtype, rngs=rngs)

    return {"encoder": encoder, "classification": sequence, "regression": sequence}


BERT = Family(
    config_from_hf=BertConfig.from_hf,
    builders=_builders(head="bert"),
    base_module="bert",
    base_prefix="bert.",
    architectures={"SEQ_CLS": "BertForSequenceClassification", "FEATURE_EXTRACTION": "BertModel"},
    module_rules=MODULE_RULES,
    legacy_names=LEGACY_NAMES,
)
# RoBERTa: BERT's modules (BertConfig.from_hf sets its positions and padding id), its own head
ROBERTA = dataclasses.replace(
    BERT,
    builders=_builders(head="roberta"),
    base_prefix="roberta.",
    architectures={"SEQ_CLS": "RobertaForSequenceClassification", "FEATURE_EXTRACTION": "RobertaModel"},
)
