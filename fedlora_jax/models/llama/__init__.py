"""The Llama family (Llama, Mistral, Qwen2): config, attention pieces, NNX modules, checkpoint names."""

from fedlora_jax.models.llama.attention import (
    KVCache,
    apply_rotary,
    causal_mask,
    grouped_attention,
    positions_from_mask,
    rope_inverse_frequencies,
    rotary_cos_sin,
    rotate_half,
)
from fedlora_jax.models.llama.config import ACTIVATIONS, Llama3RopeScaling, LlamaConfig
from fedlora_jax.models.llama.modeling import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    RMSNorm,
)
from fedlora_jax.models.llama.params import LLAMA, MISTRAL, QWEN2

__all__ = [
    "ACTIVATIONS",
    "LLAMA",
    "MISTRAL",
    "QWEN2",
    "KVCache",
    "Llama3RopeScaling",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "apply_rotary",
    "causal_mask",
    "grouped_attention",
    "positions_from_mask",
    "rope_inverse_frequencies",
    "rotary_cos_sin",
    "rotate_half",
]
