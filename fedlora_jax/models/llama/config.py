"""Llama-family hyperparameters, read from a Hugging Face ``config.json`` (llama, mistral, qwen2),
and the activations ``hidden_act`` names."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False)}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 rotary frequency scaling (HF ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-style decoder, named as in Hugging Face ``config.json``.

    Attributes:
      attention_bias: bias on q_proj/k_proj/v_proj.
      attention_out_bias: bias on o_proj (Llama: same as attention_bias; Qwen2: False).
      sliding_window: window of the sliding-window layers (a query at position p attends keys
        at p - window < k <= p); None for none.
      sliding_layers: per layer, whether it uses the sliding window (empty: none does).
      rope_scaling: Llama 3 frequency scaling, or None for plain RoPE.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_hidden_layers:
            raise ValueError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_hidden_layers} layers"
            )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: full causal attention)."""
        if self.sliding_window is None or not self.sliding_layers:
            return None
        return self.sliding_window if self.sliding_layers[layer] else None

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """Builds the config from a Hugging Face ``config.json`` dict: model_type llama, or one of
        the variants the registry serves with this family (mistral's sliding window, qwen2's
        attention biases and windowed layers)."""
        model_type = hf.get("model_type", "llama")
        heads = hf["num_attention_heads"]
        layers = hf["num_hidden_layers"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = Llama3RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
                ),
            )
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; implemented: 'default', 'llama3'")
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
            window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
            layer_types = hf.get("layer_types")
            if window is not None and layer_types is None:
                first_sliding = hf.get("max_window_layers", layers)
                layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(layers)]
        else:
            qkv_bias = out_bias = bool(hf.get("attention_bias", False))
            window = hf.get("sliding_window") if model_type == "mistral" else None
            layer_types = hf.get("layer_types") or (["sliding_attention"] * layers if window is not None else None)
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types) if window is not None else ()
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            hidden_act=hf.get("hidden_act", "silu"),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            initializer_range=hf.get("initializer_range", 0.02),
        )
