"""GGUF files (llama.cpp's format) of Llama-family decoders -> Hugging Face config and tensors.

A ``.gguf`` file holds the config as metadata (``llama.block_count``, ...), the tokenizer
(``tokenizer.ggml.*``, read by :mod:`fedlora_jax.data.tokenise`) and the weights, often quantized
(Q4_1, Q8_0, ...). The ``gguf`` package reads both; weights are dequantized to float32 numpy
arrays in PyTorch's [out, in] layout and renamed to transformers' names, so
:func:`fedlora_jax.models.load_pretrained` fills the NNX model as from safetensors. No torch.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` per head (interleaved rotary
halves); :func:`unpermute_rows` undoes it as transformers' GGUF loader does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURES = ("llama",)  # GGUF general.architecture values we read (others raise ValueError)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix)."""
    return os.fspath(path).lower().endswith(".gguf")


def _reader(path: str | os.PathLike):
    from gguf import GGUFReader  # deferred: optional dependency (the ``decoder`` extra)

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"GGUF file {os.fspath(path)!r} does not exist")
    try:
        return GGUFReader(file)
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable GGUF file ({type(err).__name__}: {err})") from None


def metadata(reader) -> dict[str, Any]:
    """Every GGUF key-value field except the tokenizer's token lists, as Python values."""
    return {key: field.contents() for key, field in reader.fields.items()
            if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                           "tokenizer.ggml.merges")}


def hf_config(meta: dict[str, Any], tensor_names: set[str], vocab_size: int) -> dict[str, Any]:
    """A transformers ``config.json`` dict from GGUF metadata; ``ValueError`` for an architecture
    other than :data:`ARCHITECTURES`."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    config = {
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for field in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{field}" in meta:
            config[field] = int(meta[f"tokenizer.ggml.{field}"])
    return config


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); None for tensors no parameter uses."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of a q/k projection [heads * head_dim, ...]:
    rows (pair, 2) of each head back to (2, pair), i.e. rotary halves as transformers has them."""
    pair = weight.shape[0] // heads // 2
    return weight.reshape(heads, pair, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(transformers config dict, transformers tensor name -> reader of a float32 numpy array) of
    a GGUF file; the readers dequantize lazily, one tensor at a time.

    Raises:
      ValueError: the file is missing, unreadable, or of an unsupported architecture.
    """
    from gguf.quants import dequantize

    reader = _reader(path)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ValueError(f"GGUF file {path} has no token_embd.weight tensor")
    vocab_size = int(by_name["token_embd.weight"].shape[-1])  # GGUF shapes are [in, out]
    config = hf_config(metadata(reader), set(by_name), vocab_size)
    permuted = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    def reader_of(tensor):
        def read() -> np.ndarray:
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))
            kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
            return unpermute_rows(array, permuted[kind]) if kind in permuted else array
        return read

    tensors = {name: reader_of(tensor) for tensor in reader.tensors if (name := hf_name(tensor.name))}
    return config, tensors
