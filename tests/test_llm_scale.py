"""LLM-scale pieces: mixed precision, rematerialisation, a frozen base split over model devices and
the memory plan read from the compiled round. The model-sharding cases run on the conftest's 2 CPU
devices as 1 client group x 2 model devices against 1 device; tests/test_gsm8k_scale.py runs the
GSM8K config the issue names (slow tier)."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from fedlora_jax.cli import main
from fedlora_jax.config import ConfigError
from fedlora_jax.engine.sharding import base_spec
from fedlora_jax.models import LoRAConfig, create_model, inject_lora, split_model
from fedlora_jax.models.remat import set_remat
from fedlora_jax.params import leaf_bytes
from fedlora_jax.run import build_experiment, run
from fedlora_jax.run import build as build_module
from fedlora_jax.run.memory import memory_plan, planned_chunk, round_memory
from fedlora_jax.tasks import blockwise_cross_entropy, model_losses
from rundirs import final_state, metrics_without_timings
from tiny import TINY, tiny_config

LLAMA = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": True}
BERT = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}


def lora_model(family: str, config: dict, remat: str | None, seed: int = 0):
    """A tiny model with LoRA whose B factors are non-zero (so every factor gets a gradient)."""
    task = "causal_lm" if family == "llama" else "classification"
    model = create_model(family, config, task=task, seed=seed)
    inject_lora(model, LoRAConfig(rank=4, alpha=8), jax.random.key(seed))
    set_remat(model, remat)
    graphdef, params, frozen = split_model(model)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape, x.dtype), params)
    return graphdef, params, frozen, task


def batch_of(task: str, rows: int, length: int, vocab: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    batch = {"input_ids": jnp.asarray(rng.integers(1, vocab, (rows, length)) * mask),
             "attention_mask": jnp.asarray(mask)}
    if task == "classification":
        batch["labels"] = jnp.asarray(rng.integers(0, 2, rows))
    return batch


def loss_gradient(graphdef, frozen, batch, task):
    def loss(params):
        return jnp.mean(model_losses(nnx.merge(graphdef, params, frozen), batch, task))

    return jax.jit(jax.value_and_grad(loss))


# ------------------------------------------------------------------------------------------- remat


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_remat_gives_the_loss_and_gradients_of_the_plain_model(family):
    """Each layer recomputed in the backward pass (and, for the decoder, its logits scored in
    blocks) gives the plain model's loss and LoRA gradients (and the head's) to float rounding."""
    config = LLAMA if family == "llama" else BERT
    graphdef, params, frozen, task = lora_model(family, config, None)
    remat_graphdef, _, _, _ = lora_model(family, config, "layer")
    batch = batch_of(task, 6, 40, config["vocab_size"])
    loss, grads = loss_gradient(graphdef, frozen, batch, task)(params)
    remat_loss, remat_grads = loss_gradient(remat_graphdef, frozen, batch, task)(params)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("length", [1, 127, 128, 300])
def test_blockwise_cross_entropy_equals_the_full_one(length):
    """Token losses and gradients (hidden states and output matrix) of the blockwise loss equal
    optax's on the full logits, for lengths below, at and across the block size."""
    rng = np.random.default_rng(length)
    hidden = jnp.asarray(rng.normal(size=(length, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, length))
    full = lambda h, w: optax.softmax_cross_entropy_with_integer_labels(h @ w, targets)
    blockwise = lambda h, w: blockwise_cross_entropy(h, w, targets, 128)
    np.testing.assert_allclose(blockwise(hidden, weight), full(hidden, weight), rtol=1e-5, atol=1e-6)
    scalar = lambda f: jax.grad(lambda h, w: jnp.sum(f(h, w) * jnp.arange(length)), argnums=(0, 1))
    for got, want in zip(scalar(blockwise)(hidden, weight), scalar(full)(hidden, weight)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_remat_at_least_halves_the_compiled_gradient_memory(family):
    """XLA's memory analysis of the compiled loss gradient: the temporaries with each layer
    rematerialised are at most half the plain model's (16 rows of 128 tokens)."""
    config = {**(LLAMA if family == "llama" else BERT), "num_hidden_layers": 4, "max_position_embeddings": 128,
              "hidden_size": 64, "intermediate_size": 256}
    temporaries = {}
    for policy in (None, "layer"):
        graphdef, params, frozen, task = lora_model(family, config, policy)
        batch = batch_of(task, 16, 128, config["vocab_size"])
        compiled = loss_gradient(graphdef, frozen, batch, task).lower(params).compile()
        temporaries[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries["layer"] <= 0.5 * temporaries[None], temporaries


# --------------------------------------------------------------------------------- mixed precision


def test_bfloat16_base_trains_float32_factors_head_and_optimiser_state():
    """model.dtype=bfloat16: every floating frozen leaf is bfloat16, the LoRA factors, the head
    and the local optimiser's state are float32; two rounds (one under DP-SGD) run with finite
    metrics, the factors move, and every dtype stays as it was."""
    for privacy in ({}, {"privacy.record_level": True, "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0}):
        config = tiny_config(**{"model.dtype": "bfloat16", "federation.rounds": 2, "federation.local_steps": 2,
                                "data.test_examples": 32, "eval.local": False, **privacy})
        exp = build_experiment(config)
        floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats(exp.frozen) and all(x.dtype == jnp.bfloat16 for x in floats(exp.frozen))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(exp.params))
        opt_state = jax.eval_shape(exp.federation.trainer.optimizer.init, exp.params)
        assert floats(opt_state) and all(x.dtype == jnp.float32 for x in floats(opt_state))
        before = jax.device_get(exp.params)
        result = run(config, None, progress=False, experiment=exp)
        for record in result.history:
            assert all(np.isfinite(record[k]) for k in ("train_loss", "global_loss", "global_accuracy", "divergence"))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(result.state.params))
        assert all(x.dtype == jnp.bfloat16 for x in floats(result.state.frozen))
        assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                            jax.tree.leaves(jax.device_get(result.state.params))))


# ---------------------------------------------------------------------------------- model devices


def test_base_spec_splits_columns_rows_and_large_leaves():
    assert base_spec("bert.layers.0.attention.query.kernel", (64, 64), 2) == jax.sharding.PartitionSpec(None, "model")
    assert base_spec("model.layers.1.mlp.down_proj.kernel", (128, 64), 2) == jax.sharding.PartitionSpec("model")
    assert base_spec("model.embed_tokens.embedding", (30522, 64), 2) == jax.sharding.PartitionSpec("model")
    assert base_spec("model.norm.scale", (64,), 2) == jax.sharding.PartitionSpec()
    assert base_spec("model.layers.0.self_attn.q_proj.kernel", (64, 64), 1) == jax.sharding.PartitionSpec()


MODEL_CASES = {
    # packed local steps, local evaluation, a checkpoint every round
    "packed": {"data.packing": "auto", "checkpoint.every": 1},
    # a streaming method in chunks of 2: each chunk's uploads reduced as it finishes
    "streamed": {"federation.clients_per_chunk": 2, "eval.local": False},
    # DP-SGD with book-keeping per-example gradients, Poisson batches
    "record_dp": {"privacy.record_level": True, "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 0.05,
                  "eval.local": False},
    # DP-FedAvg: the clipped noisy mean at the server
    "user_dp": {"federation.clients_per_round": 3, "privacy.user_level": True, "privacy.user_noise_multiplier": 1.0,
                "privacy.user_clip_norm": 0.05, "eval.local": False},
    # a method that rewrites the split base (FedEx-LoRA's residual)
    "fedex": {"federation.method": "fedex", "eval.local": False, "checkpoint.every": 1},
}
WIDER = {"model.config.hidden_size": 64, "model.config.intermediate_size": 128, "federation.rounds": 2,
         "federation.local_steps": 2}


def device_bytes(tree) -> dict[int, int]:
    """Bytes each device holds of ``tree``'s arrays."""
    held: dict[int, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


@pytest.mark.parametrize("case", ["packed", pytest.param("streamed", marks=pytest.mark.slow),
                                  pytest.param("record_dp", marks=pytest.mark.slow),
                                  pytest.param("user_dp", marks=pytest.mark.slow),
                                  pytest.param("fedex", marks=pytest.mark.slow)])
def test_base_split_over_two_model_devices_gives_the_run_of_one_device(case, tmp_path):
    """federation.model_devices=2 on 2 devices (1 client group x 2 model devices): the metrics and
    final checkpoint of a run on 1 device (1e-5), and each device holds half of the base's large
    leaves (norms and biases stay whole)."""
    overrides = {**WIDER, **MODEL_CASES[case], "checkpoint.every": 1}
    split = tiny_config(**overrides, **{"federation.model_devices": 2})
    one = tiny_config(**overrides, **{"federation.devices": 1})
    exp = build_experiment(split)
    assert exp.federation.devices == 2 and exp.federation.model_devices == 2 and exp.federation.mesh.shape == {
        "clients": 1, "model": 2}
    result = run(split, tmp_path / "split", progress=False, experiment=exp)
    run(one, tmp_path / "one", progress=False, experiment=build_experiment(one, exp.data))
    a, b = metrics_without_timings(tmp_path / "split"), metrics_without_timings(tmp_path / "one")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in y:
            np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-5, err_msg=f"{case}: {key}")
    got, want = final_state(tmp_path / "split"), final_state(tmp_path / "one")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    frozen = result.state.frozen
    total = int(leaf_bytes(frozen).sum())
    small = sum(x.nbytes for x in jax.tree.leaves(frozen) if not x.sharding.spec)
    held = device_bytes(frozen)
    assert sorted(held) == [0, 1] and all(n == (total - small) // 2 + small for n in held.values()), (held, total)
    assert small < 0.15 * total


def test_resume_of_a_split_base_run_equals_the_uninterrupted_run(tmp_path):
    """A run with its base split over 2 model devices, resumed from its round-2 checkpoint, ends
    where the uninterrupted run does (bit for bit)."""
    config = tiny_config(**{**WIDER, "federation.rounds": 3, "federation.model_devices": 2, "checkpoint.every": 1,
                            "checkpoint.keep": 3})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["run", str(path), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "round_000003")
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:2]
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["resume", str(tmp_path / "cut"), "--quiet"]) == 0
    assert metrics_without_timings(tmp_path / "cut")[2] == metrics_without_timings(tmp_path / "full")[2]
    got, want = final_state(tmp_path / "cut"), final_state(tmp_path / "full")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_model_devices_that_do_not_divide_the_mesh_are_one_line(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "federation": {**TINY["federation"], "model_devices": 3}}))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "federation.model_devices' is 3, which does not divide the 2 device(s)" in err[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- memory plan

PLANNED = {"federation.devices": 1, "eval.local": False, "data.packing": "null"}


def test_memory_plan_predicts_the_compiled_peak_and_fits_the_chunk_to_the_budget():
    """The plan's fixed + per-client split (from rounds compiled at chunks of 1 and 2) bounds the
    compiled peak at 3 clients per chunk from above, within 10% (XLA reuses some buffers across a
    wider chunk); the chosen chunk is the largest that fits."""
    exp = build_experiment(tiny_config(**PLANNED))
    fed, share = exp.federation, exp.plan.share
    assert share == 5
    plan = memory_plan(fed, exp.params, exp.frozen, exp.data, share, 10**12, None)
    assert plan.per_client > 0 and plan.fixed > plan.base > 0 and plan.chunk == share
    compiled = round_memory(dataclasses.replace(fed, clients_per_chunk=3), exp.params, exp.frozen, exp.data).peak
    assert compiled <= plan.peak(3) <= 1.1 * compiled, (plan, compiled)
    assert plan.per_client_remat is not None and plan.per_client_plain == plan.per_client
    budget = plan.peak(3) + plan.per_client // 2
    assert memory_plan(fed, exp.params, exp.frozen, exp.data, share, budget, None, compare_remat=False).chunk == 3
    # 5 clients in chunks of at most 3: two even chunks of 3 (the second holds the remaining 2)
    assert planned_chunk(fed, exp.params, exp.frozen, exp.data, share, budget, None) == 3
    with pytest.raises(ConfigError, match="model.remat: layer, model.quantize: int8 or nf4, a larger "
                                          "federation.model_devices, a smaller data.max_length"):
        planned_chunk(fed, exp.params, exp.frozen, exp.data, share, plan.peak(1) - 1, None)


def test_auto_chunk_on_an_accelerator_is_planned_from_the_compiled_round(monkeypatch):
    """On an accelerator (the backend name patched), clients_per_chunk: auto takes the largest
    chunk whose compiled round fits federation.memory_fraction of the device, and a device that
    cannot hold one client's round is refused in one line naming what to change."""
    exp = build_experiment(tiny_config(**PLANNED))
    plan = memory_plan(exp.federation, exp.params, exp.frozen, exp.data, 5, 10**12, None, compare_remat=False)
    monkeypatch.setattr(build_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(build_module, "memory_available", lambda: int((plan.peak(2) + 10) / 0.5))
    planned = build_experiment(tiny_config(**PLANNED, **{"federation.memory_fraction": 0.5}), exp.data)
    assert planned.federation.clients_per_chunk == 2 and planned.plan.clients_per_chunk == 2
    monkeypatch.setattr(build_module, "memory_available", lambda: plan.peak(1) // 2)
    with pytest.raises(ConfigError, match="one client's round needs"):
        build_experiment(tiny_config(**PLANNED), exp.data)


def test_describe_plan_prints_the_memory_plan(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**PLANNED, **{"model.remat": "layer"}).to_dict()))
    assert main(["describe", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    for text in ("memory per device", "remat layer", "frozen base", "per client in a chunk",
                 "activations per token", "largest chunk that fits"):
        assert text in out


def test_a_quantized_base_with_remat_dequantizes_one_layer_at_a_time():
    """Four vmapped clients' loss gradients over an int8 base with remat: the frozen state taken
    as an argument is about a quarter of the float one, and the temporaries exceed the float
    base's (remat too) by less than a third of the float base (one layer and the output matrix
    dequantized at a time, shared by the clients), not by a copy of the base per client."""
    from fedlora_jax.models.quantize import quantize_base

    config = {**LLAMA, "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 256, "vocab_size": 256}
    measured = {}
    for scheme in (None, "int8"):
        model = create_model("llama", config, task="causal_lm")
        inject_lora(model, LoRAConfig(rank=4, alpha=8), jax.random.key(0))
        set_remat(model, "layer")
        if scheme:
            quantize_base(model, scheme)
        graphdef, params, frozen = split_model(model)
        batch = batch_of("causal_lm", 4, 64, config["vocab_size"])

        def grads(params, frozen):
            loss = lambda p: jnp.mean(model_losses(nnx.merge(graphdef, p, frozen), batch, "causal_lm"))
            return jax.vmap(jax.grad(loss))(params)

        stacked = jax.tree.map(lambda x: jnp.stack([x] * 4), params)
        memory = jax.jit(grads).lower(stacked, frozen).compile().memory_analysis()
        measured[scheme] = (int(leaf_bytes(frozen).sum()), memory.temp_size_in_bytes)
    (float_base, float_temp), (int8_base, int8_temp) = measured[None], measured["int8"]
    assert int8_base <= 0.3 * float_base
    assert int8_temp <= float_temp + float_base / 3, measured


@pytest.mark.slow
def test_two_processes_with_a_split_base_give_the_metrics_of_one_device(tmp_path):
    """`fedlora-jax run` in two CPU processes of 2 devices each, federation.model_devices=2 (each
    process one client group whose base is split over its 2 devices, a checkpoint every round):
    the metrics and final checkpoint of a one-device run (1e-5)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    config = tiny_config(**WIDER, **{"federation.model_devices": 2, "checkpoint.every": 1}).to_dict()
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(config))
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**config, "federation": {**config["federation"], "model_devices": 1,
                                                              "devices": 1}}))
    assert main(["run", str(one), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "fedlora_jax", "run", str(path), "--out", str(tmp_path / "two"),
                               "--quiet", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    a, b = metrics_without_timings(tmp_path / "two"), metrics_without_timings(tmp_path / "one")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in y:
            np.testing.assert_allclose(x[key], y[key], atol=1e-5, err_msg=key)
    got, want = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
