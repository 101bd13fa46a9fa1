"""Transformer models (NNX), Hugging Face weight loading and LoRA."""

from fedlora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from fedlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from fedlora_jax.models.lora import (
    TRAINABLE,
    LoRAConfig,
    LoRALinear,
    LoRAParam,
    inject_lora,
    lora_layers,
    merge_lora,
    split_model,
)
from fedlora_jax.models.weights import (
    create_model,
    load_pretrained,
    model_config_from_pretrained,
)

__all__ = [
    "TRAINABLE",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoRAConfig",
    "LoRALinear",
    "LoRAParam",
    "create_model",
    "inject_lora",
    "load_pretrained",
    "lora_layers",
    "merge_lora",
    "model_config_from_pretrained",
    "split_model",
]
