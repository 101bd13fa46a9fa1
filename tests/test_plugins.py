"""Methods as plug-ins: a method defined outside the package (examples/server_momentum.py, FFA-LoRA
with server momentum and its own server state) runs from a config, computes what it says, and its
state survives a checkpoint and resume; the registry's errors are one clear line."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from fedlora_jax.cli import main
from fedlora_jax.methods import Method, make_method, method_names, register_method
from fedlora_jax.params import leaf_names
from fedlora_jax.engine import device_shards, init_server_state
from tiny import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "server_momentum:ffa_momentum"


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))


def as_dict(tree) -> dict[str, np.ndarray]:
    return {n: np.asarray(x, np.float64) for n, x in zip(leaf_names(tree), jax.tree.leaves(tree))}


def test_plugin_method_computes_server_momentum_over_rounds():
    beta, server_lr = 0.5, 0.8
    exp = tiny_experiment(**{"federation.method": PLUGIN, "federation.method_options.beta": beta,
                             "federation.method_options.server_lr": server_lr})
    fed = exp.federation
    assert fed.method.name == PLUGIN and PLUGIN not in method_names()
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=fed)
    shards = device_shards(exp.data)
    velocity = {n: np.zeros_like(v) for n, v in as_dict(exp.params).items()}
    play = jax.jit(fed.round)
    for _ in range(3):
        before = as_dict(state.params)
        state, out = play(state, shards)
        counts = exp.data.num_train[np.asarray(out.cohort)].astype(np.float64)
        w = counts / counts.sum()
        clients, after = as_dict(out.client_params), as_dict(state.params)
        for name in before:
            mean = np.einsum("k,k...->...", w, clients[name])
            velocity[name] = beta * velocity[name] + (mean - before[name])
            np.testing.assert_allclose(after[name], before[name] + server_lr * velocity[name], atol=1e-6, err_msg=name)
            if name.endswith("lora_a"):
                np.testing.assert_array_equal(after[name], before[name])  # A stays frozen
        for name, v in as_dict(state.method_state).items():
            np.testing.assert_allclose(v, velocity[name], atol=1e-6, err_msg=name)
    assert max(np.abs(v).max() for n, v in velocity.items() if n.endswith("lora_b")) > 0
    up, down = fed.communication_bytes(exp.params, exp.frozen, 0)
    b_and_head = sum(x.nbytes for n, x in zip(leaf_names(exp.params), jax.tree.leaves(exp.params))
                     if not n.endswith("lora_a"))
    assert up == down == fed.cohort_size * b_and_head


@pytest.mark.slow  # quick twins: test_plugin_method_computes_server_momentum_over_rounds, test_paths.py's resume of method state
def test_plugin_runs_from_a_config_and_its_state_survives_resume(tmp_path):
    config = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    config["federation"].update(method=PLUGIN, method_options={"beta": 0.9}, rounds=4, clients_per_round=3,
                                local_steps=2)
    config["model"]["config"]["num_hidden_layers"] = 1
    config["eval"].update(every=2, local=False)
    config["data"].update(test_examples=64, packing=None)
    config["checkpoint"] = {"every": 2, "keep": 2}
    path = tmp_path / "momentum.yaml"
    path.write_text(yaml.safe_dump(config))
    reference = tmp_path / "reference"
    assert main(["run", str(path), "--out", str(reference), "--quiet"]) == 0
    state = load_file(str(reference / "checkpoints" / "round_000004" / "state.safetensors"))
    assert any(k.startswith("method/") for k in state) and max(np.abs(v).max() for k, v in state.items()
                                                               if k.startswith("method/")) > 0
    # resume from round 2: rounds 3 and 4 use the restored velocity and must repeat the run exactly
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "round_000004")
    assert main(["resume", str(resumed), "--quiet"]) == 0
    drop_timings = lambda run: [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert drop_timings(resumed) == drop_timings(reference)
    again = load_file(str(resumed / "checkpoints" / "round_000004" / "state.safetensors"))
    for name in state:
        np.testing.assert_array_equal(again[name], state[name], err_msg=name)
    assert main(["export", str(reference), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def not_a_method(**options):
    return 42


def test_registry_and_plugin_errors_are_one_clear_line(capsys, tmp_path):
    assert {"fedit", "ffa", "fra", "fra_then_ffa", "flora_na", "fedex", "flora", "fedsa", "rolora"} <= set(method_names())
    cases = [
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("server_momentum:nothing", "has no callable 'nothing'"),
        ("test_plugins:not_a_method", "returned int, not a fedlora_jax Method"),
        ("fedavgx", "unknown method 'fedavgx'"),
    ]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            make_method(name)
    with pytest.raises(ValueError, match=r"unknown option\(s\) gamma \(allowed: beta, server_lr\)"):
        make_method(PLUGIN, {"gamma": 1.0})
    with pytest.raises(ValueError, match="beta must be in"):
        make_method(PLUGIN, {"beta": 1.5})
    with pytest.raises(ValueError, match="already registered"):
        register_method("fedit", lambda: Method())
    with pytest.raises(ValueError, match="no ':'"):
        register_method("a:b", lambda: Method())
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet",
                 "--set", "federation.method=server_momentum:nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no callable 'nothing'" in err[0]
    assert not out.exists() or not any(out.iterdir())
