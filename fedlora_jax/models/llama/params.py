"""The Llama family's rows of the registry (``llama``, ``mistral``, ``qwen2``): its model and the
Hugging Face names of its parameters, which loading and PEFT export share. Module names are
transformers' own (``layers.<i>.self_attn.q_proj``), so there are no module rules; checkpoints
that fuse projections (``qkv_proj``, ``gate_up_proj``) are split by rows."""

from __future__ import annotations

import dataclasses

from fedlora_jax.models.family import Family
from fedlora_jax.models.llama.config import LlamaConfig
from fedlora_jax.models.llama.modeling import LlamaForCausalLM


def causal_lm(config: LlamaConfig, *, num_labels, pooling, dtype, rngs) -> LlamaForCausalLM:
    """The causal language model (``num_labels`` and ``pooling`` do not apply)."""
    return LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=rngs)


def fused_projections(config: LlamaConfig) -> dict[str, tuple[str, int, int]]:
    """Separate projection -> (fused checkpoint projection, first row, rows): q/k/v in
    ``qkv_proj``, gate/up in ``gate_up_proj``."""
    query, key_value, inner = (config.num_attention_heads * config.head_dim,
                               config.num_key_value_heads * config.head_dim, config.intermediate_size)
    return {
        "q_proj": ("qkv_proj", 0, query),
        "k_proj": ("qkv_proj", query, key_value),
        "v_proj": ("qkv_proj", query + key_value, key_value),
        "gate_proj": ("gate_up_proj", 0, inner),
        "up_proj": ("gate_up_proj", inner, inner),
    }


LLAMA = Family(
    config_from_hf=LlamaConfig.from_hf,
    builders={"causal_lm": causal_lm},
    base_module="model",
    base_prefix="model.",
    architectures={"CAUSAL_LM": "LlamaForCausalLM"},
    fused_projections=fused_projections,
)
# variants: LlamaConfig.from_hf reads their config quirks (sliding windows, qwen2's biases)
MISTRAL = dataclasses.replace(LLAMA, architectures={"CAUSAL_LM": "MistralForCausalLM"})
QWEN2 = dataclasses.replace(LLAMA, architectures={"CAUSAL_LM": "Qwen2ForCausalLM"})
