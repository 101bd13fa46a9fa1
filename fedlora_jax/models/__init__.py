"""Transformer models (NNX), one folder per family, found through one registry; Hugging Face
weight loading, LoRA, and a weight-only quantized frozen base (int8, NF4)."""

from fedlora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from fedlora_jax.models.family import Family
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
from fedlora_jax.models.quantize import (
    QuantizedEmbed,
    QuantizedWeight,
    dequantize_base,
    frozen_bytes,
    quantize_base,
)
from fedlora_jax.models.registry import FAMILIES, TASKS, family_of
from fedlora_jax.models.weights import (
    create_model,
    hf_tensor_name,
    load_pretrained,
    model_config_from_pretrained,
    resolve_checkpoint_dir,
)

__all__ = [
    "FAMILIES",
    "TASKS",
    "TRAINABLE",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "Family",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoRAConfig",
    "LoRALinear",
    "LoRAParam",
    "QuantizedEmbed",
    "QuantizedWeight",
    "create_model",
    "dequantize_base",
    "family_of",
    "frozen_bytes",
    "hf_tensor_name",
    "inject_lora",
    "load_pretrained",
    "lora_layers",
    "merge_lora",
    "model_config_from_pretrained",
    "quantize_base",
    "resolve_checkpoint_dir",
    "split_model",
]
