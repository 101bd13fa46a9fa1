"""LoRA injection, trainable/frozen split and merging on tiny BERT and Llama models."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax.models import (
    TRAINABLE,
    LoRAConfig,
    LoRALinear,
    LoRAParam,
    create_model,
    inject_lora,
    lora_layers,
    merge_lora,
    split_model,
)

ENCODER = {
    "vocab_size": 50,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
}
DECODER = {
    "vocab_size": 50,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
KEY = jax.random.key(0)


def _bert(head: str = "bert"):
    return create_model(head, ENCODER, task="classification", num_labels=3, seed=1)


def _llama(tied: bool = False):
    return create_model("llama", {**DECODER, "tie_word_embeddings": tied}, task="causal_lm", seed=1)


def _inputs(seed: int = 0):
    ids = jax.random.randint(jax.random.key(seed), (2, 6), 2, 50)
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    return ids, mask


def _randomise_b(model, key):
    for i, layer in enumerate(lora_layers(model).values()):
        layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), layer.lora_b[...].shape)


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def test_default_targets_bert():
    model = _bert()
    adapted = inject_lora(model, LoRAConfig(rank=4), KEY)
    assert sorted(adapted) == sorted(
        f"bert.layers.{i}.attention.{name}" for i in range(2) for name in ("query", "value")
    )
    assert isinstance(model.bert.layers[1].attention.value, LoRALinear)
    assert isinstance(model.bert.layers[1].attention.key, nnx.Linear)


def test_default_targets_llama():
    adapted = inject_lora(_llama(), LoRAConfig(rank=4), KEY)
    assert sorted(adapted) == sorted(
        f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")
    )


@pytest.mark.parametrize("head", ["bert", "roberta"])
def test_all_linear_excludes_the_task_head(head):
    model = _bert(head)
    adapted = inject_lora(model, LoRAConfig(rank=2, targets=("all-linear",)), KEY)
    per_layer = ("query", "key", "value", "attention_output", "intermediate", "output")
    assert len(adapted) == 2 * len(per_layer) + (1 if head == "bert" else 0)  # + the frozen BERT pooler
    assert not any("head" in path for path in adapted)
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_graph(model.head))


def test_all_linear_excludes_lm_head():
    model = _llama()
    adapted = inject_lora(model, LoRAConfig(rank=2, targets=("all-linear",)), KEY)
    assert len(adapted) == 2 * 7
    assert isinstance(model.lm_head, nnx.Linear) and not isinstance(model.lm_head, LoRALinear)


def test_regex_targets():
    model = _llama()
    adapted = inject_lora(model, LoRAConfig(rank=2, targets=(r"model\.layers\.1\.mlp\.(gate|up)_proj",)), KEY)
    assert sorted(adapted) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_targets_matching_nothing_raise():
    with pytest.raises(ValueError, match="match no linear layer"):
        inject_lora(_bert(), LoRAConfig(rank=2, targets=("q_proj",)), KEY)


@pytest.mark.parametrize("rank", [0, -3])
def test_non_positive_rank_raises(rank):
    with pytest.raises(ValueError, match="lora rank must be a positive integer"):
        LoRAConfig(rank=rank)


@pytest.mark.parametrize("build", [_bert, _llama])
def test_zero_b_leaves_output_unchanged(build):
    model = build()
    before = model(*_inputs())
    inject_lora(model, LoRAConfig(rank=4, targets=("all-linear",)), KEY)
    np.testing.assert_array_equal(model(*_inputs()), before)


def test_a_init_bounds_and_b_zero():
    model = _llama()
    inject_lora(model, LoRAConfig(rank=8, targets=("all-linear",)), KEY)
    for layer in lora_layers(model).values():
        a, b = layer.lora_a[...], layer.lora_b[...]
        bound = 1.0 / math.sqrt(layer.in_features)
        assert a.shape == (8, layer.in_features) and b.shape == (layer.out_features, 8)
        assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.5 * bound
        assert not bool(jnp.any(b))


def test_same_key_gives_same_a_and_other_key_differs():
    first, second, other = _bert(), _bert(), _bert()
    config = LoRAConfig(rank=4)
    inject_lora(first, config, KEY)
    inject_lora(second, config, KEY)
    inject_lora(other, config, jax.random.key(1))
    a_first = {p: m.lora_a[...] for p, m in lora_layers(first).items()}
    for path, layer in lora_layers(second).items():
        np.testing.assert_array_equal(layer.lora_a[...], a_first[path])
    assert any(not np.array_equal(m.lora_a[...], a_first[p]) for p, m in lora_layers(other).items())
    query, value = (a_first[f"bert.layers.0.attention.{n}"] for n in ("query", "value"))
    assert not np.array_equal(query, value)  # each layer draws its own A


@pytest.mark.parametrize("build", [_bert, _llama])
def test_split_model_trains_only_lora_factors_and_head(build):
    model = build()
    inject_lora(model, LoRAConfig(rank=4), KEY)
    _, trainable, frozen = split_model(model)
    trainable_paths = [path for path, _ in nnx.to_flat_state(trainable)]
    lora_paths = [p for p in trainable_paths if p[-1] in ("lora_a", "lora_b")]
    head_paths = [p for p in trainable_paths if "head" in p]
    assert len(lora_paths) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)
    assert sorted(lora_paths + head_paths) == sorted(trainable_paths)
    assert bool(head_paths) == (build is _bert)  # lm_head is frozen
    frozen_paths = [path for path, _ in nnx.to_flat_state(frozen)]
    assert not any(p[-1] in ("lora_a", "lora_b") or "head" in p for p in frozen_paths)
    assert all(isinstance(v, LoRAParam) for p, v in nnx.to_flat_state(trainable) if p in lora_paths)
    assert len(nnx.to_flat_state(nnx.state(model, TRAINABLE))) == len(trainable_paths)


@pytest.mark.parametrize("build", [_bert, _llama])
def test_merge_lora_matches_unmerged(build):
    model = build()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("all-linear",)), KEY)
    _randomise_b(model, jax.random.key(2))
    base = build()
    unmerged = model(*_inputs())
    assert float(jnp.abs(unmerged - base(*_inputs())).max()) > 1e-3  # the adapters matter
    merge_lora(model)
    np.testing.assert_allclose(model(*_inputs()), unmerged, atol=1e-5)
    assert all(not bool(jnp.any(m.lora_b[...])) for m in lora_layers(model).values())


def test_rslora_scaling():
    assert LoRAConfig(rank=4, alpha=8.0).scaling == 2.0
    assert LoRAConfig(rank=4, alpha=8.0, rslora=True).scaling == 4.0
    model = _llama()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, rslora=True), KEY)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling == 4.0
    _randomise_b(model, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (3, layer.in_features))
    delta = layer(x) - x @ layer.kernel[...]
    expected = 4.0 * (x @ layer.lora_a[...].T) @ layer.lora_b[...].T
    np.testing.assert_allclose(delta, expected, atol=1e-5)


@pytest.mark.parametrize("build", [_bert, _llama])
def test_split_states_run_under_jit_and_differentiate(build):
    model = build()
    inject_lora(model, LoRAConfig(rank=4), KEY)
    graphdef, trainable, frozen = split_model(model)
    ids, mask = _inputs()

    @jax.jit
    def loss(trainable_state, frozen_state):
        logits = nnx.merge(graphdef, trainable_state, frozen_state)(ids, mask)
        return jnp.mean(logits.astype(jnp.float32) ** 2)

    np.testing.assert_allclose(loss(trainable, frozen), jnp.mean(model(ids, mask) ** 2), rtol=1e-5)
    grads = nnx.to_flat_state(jax.grad(loss)(trainable, frozen))
    b_grads = [g[...] for p, g in grads if p[-1] == "lora_b"]
    assert b_grads and all(float(jnp.abs(g).max()) > 0 for g in b_grads)
