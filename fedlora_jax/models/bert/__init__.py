"""The BERT family (BERT, RoBERTa): config, attention kernels, NNX modules, checkpoint names."""

from fedlora_jax.models.bert.attention import attention_mask_for, padding_attention, stream_attention
from fedlora_jax.models.bert.config import ACTIVATIONS, BertConfig, gelu_exact
from fedlora_jax.models.bert.modeling import (
    HEAD_KINDS,
    BertEmbeddings,
    BertForSequenceClassification,
    BertLayer,
    BertModel,
    BertSelfAttention,
    RobertaClassificationHead,
    first_token_states,
    roberta_position_ids,
)
from fedlora_jax.models.bert.params import BERT, ROBERTA

__all__ = [
    "ACTIVATIONS",
    "BERT",
    "HEAD_KINDS",
    "ROBERTA",
    "BertConfig",
    "BertEmbeddings",
    "BertForSequenceClassification",
    "BertLayer",
    "BertModel",
    "BertSelfAttention",
    "RobertaClassificationHead",
    "attention_mask_for",
    "first_token_states",
    "gelu_exact",
    "padding_attention",
    "roberta_position_ids",
    "stream_attention",
]
