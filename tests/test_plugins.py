"""Methods as plug-ins: a method defined outside the package (examples/trimmed_mean.py, FFA-LoRA
with a coordinate-wise trimmed mean of B, a robust aggregation that is no weighted mean) runs from
a config, computes what it says, keeps A frozen and resumes to the same run; the registry's
errors are one clear line."""

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
PLUGIN = "trimmed_mean:ffa_trimmed"


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))


def as_dict(tree) -> dict[str, np.ndarray]:
    return {n: np.asarray(x, np.float64) for n, x in zip(leaf_names(tree), jax.tree.leaves(tree))}


def numpy_trimmed_mean(x: np.ndarray, taking_part: np.ndarray, trim: float) -> np.ndarray:
    """Per coordinate: sort the n participants' values, drop int(trim * n) at each end, average the rest."""
    ranked = np.sort(np.asarray(x, np.float64)[taking_part], axis=0)
    cut = int(trim * len(ranked))
    return ranked[cut:len(ranked) - cut].mean(axis=0)


def test_plugin_aggregate_is_a_trimmed_mean_over_the_clients_taking_part():
    rng = np.random.default_rng(0)
    k, d_out, r, d_in = 7, 5, 3, 4
    b = rng.normal(size=(k, d_out, r)).astype(np.float32)
    b[2] = 1e6  # empty slots (weight 0) with extreme values: they must not enter the ranks or the count
    b[5] = -1e6
    a = np.broadcast_to(rng.normal(size=(r, d_in)), (k, r, d_in)).astype(np.float32)
    counts = np.array([3, 9, 0, 1, 4, 0, 2], np.float32)
    w = counts / counts.sum()
    part = w > 0
    key = jax.random.key(0)
    for trim in (0.0, 0.1, 0.2, 0.3, 0.49):
        method = make_method(PLUGIN, {"trim": trim})
        assert method.name == PLUGIN and not method.mean_based and not method.streaming
        out = jax.jit(method.aggregate)(b, a, w, 0, key)
        np.testing.assert_allclose(out.b, numpy_trimmed_mean(b, part, trim), rtol=1e-6, atol=1e-6, err_msg=str(trim))
        np.testing.assert_array_equal(out.a, a[0])  # A is frozen
        # vmappable over a leading module axis (how the engine maps same-shape modules)
        stacked = jax.vmap(lambda b_, a_: method.aggregate(b_, a_, w, 0, key))(np.stack([b, -b]), np.stack([a, a]))
        np.testing.assert_allclose(stacked.b[1], numpy_trimmed_mean(-b, part, trim), rtol=1e-6, atol=1e-6)
    # five participants: trim 0.2 drops the smallest and the largest per coordinate (here 1 and 9)
    column = np.array([1.0, 5.0, 0.0, 4.0, 9.0, 0.0, 2.0], np.float32).reshape(k, 1, 1)
    out = make_method(PLUGIN, {"trim": 0.2}).aggregate(column, np.ones((k, 1, 1), np.float32), w, 0, key)
    np.testing.assert_allclose(out.b, [[(5.0 + 4.0 + 2.0) / 3]], rtol=1e-6)
    # trim 0: the unweighted mean of the participants; FFA-LoRA's weighted mean only under equal weights
    plain = make_method(PLUGIN, {"trim": 0.0})
    np.testing.assert_allclose(plain.aggregate(b, a, w, 0, key).b, b[part].mean(axis=0), rtol=1e-6, atol=1e-6)
    assert not np.allclose(plain.aggregate(b, a, w, 0, key).b, make_method("ffa").aggregate(b, a, w, 0, key).b)
    equal = part / part.sum()
    np.testing.assert_allclose(plain.aggregate(b, a, equal, 0, key).b,
                               make_method("ffa").aggregate(b, a, equal, 0, key).b, rtol=1e-5, atol=1e-6)


def test_plugin_method_trims_the_uploaded_b_over_rounds():
    trim = 0.2  # a cohort of 5: the smallest and the largest client per coordinate are dropped
    exp = tiny_experiment(**{"federation.method": PLUGIN, "federation.method_options.trim": trim})
    fed = exp.federation
    assert fed.method.name == PLUGIN and PLUGIN not in method_names()
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=fed)
    shards = device_shards(exp.data)
    play = jax.jit(fed.round)
    for _ in range(2):
        before = as_dict(state.params)
        state, out = play(state, shards)
        part = np.asarray(out.cohort_mask, bool)
        counts = exp.data.num_train[np.asarray(out.cohort)].astype(np.float64) * part
        w = counts / counts.sum()
        clients, after = as_dict(out.client_params), as_dict(state.params)
        for name in before:
            if name.endswith("lora_a"):
                np.testing.assert_array_equal(after[name], before[name], err_msg=name)  # A stays frozen
            elif name.endswith("lora_b"):
                np.testing.assert_allclose(after[name], numpy_trimmed_mean(clients[name], part, trim), atol=1e-6,
                                           err_msg=name)
            else:  # the head keeps the engine's weighted mean
                np.testing.assert_allclose(after[name], np.einsum("k,k...->...", w, clients[name]), atol=1e-6,
                                           err_msg=name)
    assert max(np.abs(v).max() for n, v in as_dict(state.params).items() if n.endswith("lora_b")) > 0
    assert as_dict(state.method_state) == {}  # no server state of its own
    up, down = fed.communication_bytes(exp.params, exp.frozen, 0)
    b_and_head = sum(x.nbytes for n, x in zip(leaf_names(exp.params), jax.tree.leaves(exp.params))
                     if not n.endswith("lora_a"))
    assert up == down == fed.cohort_size * b_and_head


# quick twins: test_plugin_method_trims_the_uploaded_b_over_rounds, test_paths.py's resume of method state
@pytest.mark.slow
def test_plugin_runs_from_a_config_and_resumes_to_the_same_run(tmp_path):
    config = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    config["federation"].update(method=PLUGIN, method_options={"trim": 0.25}, rounds=4, clients_per_round=4,
                                local_steps=2)
    config["model"]["config"]["num_hidden_layers"] = 1
    config["eval"].update(every=2, local=False)
    config["data"].update(test_examples=64, packing=None)
    config["checkpoint"] = {"every": 2, "keep": 2}
    path = tmp_path / "trimmed.yaml"
    path.write_text(yaml.safe_dump(config))
    reference = tmp_path / "reference"
    assert main(["run", str(path), "--out", str(reference), "--quiet"]) == 0
    checkpoints = reference / "checkpoints"
    state = load_file(str(checkpoints / "round_000004" / "state.safetensors"))
    earlier = load_file(str(checkpoints / "round_000002" / "state.safetensors"))
    assert not any(k.startswith("method/") for k in state)
    lora_a = [k for k in state if k.endswith("lora_a")]
    lora_b = [k for k in state if k.endswith("lora_b")]
    assert lora_a and lora_b
    for name in lora_a:  # A stays bit-identical over the run
        np.testing.assert_array_equal(state[name], earlier[name], err_msg=name)
    assert any(not np.array_equal(state[name], earlier[name]) for name in lora_b)
    # resume from round 2: rounds 3 and 4 must repeat the run exactly
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
    assert ({"fedit", "ffa", "fra", "fra_then_ffa", "flora_na", "fedex", "flora", "fedsa", "rolora"}
            <= set(method_names()))
    cases = [
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("trimmed_mean:nothing", "has no callable 'nothing'"),
        ("test_plugins:not_a_method", "returned int, not a fedlora_jax Method"),
        ("fedavgx", "unknown method 'fedavgx'"),
    ]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            make_method(name)
    with pytest.raises(ValueError, match=r"unknown option\(s\) gamma \(allowed: trim\)"):
        make_method(PLUGIN, {"gamma": 1.0})
    for trim in (0.5, -0.1, True, "a lot"):
        with pytest.raises(ValueError, match=r"option trim must be a number in \[0, 0\.5\)"):
            make_method(PLUGIN, {"trim": trim})
    with pytest.raises(ValueError, match="already registered"):
        register_method("fedit", lambda: Method())
    with pytest.raises(ValueError, match="no ':'"):
        register_method("a:b", lambda: Method())
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet",
                 "--set", "federation.method=trimmed_mean:nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no callable 'nothing'" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_plugin_bad_option_and_server_optimiser_are_refused_with_one_line(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet",
                 "--set", f"federation.method={PLUGIN}", "--set", "federation.method_options.trim=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "option trim must be a number in [0, 0.5), got 0.5" in err[0]
    assert not out.exists() or not any(out.iterdir())
    # a trimmed mean is no weighted mean: a server optimiser (which steps from the mean) is refused
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet",
                 "--set", f"federation.method={PLUGIN}",
                 "--set", "federation.server_optimizer={name: sgd, learning_rate: 1.0, momentum: 0.9}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a method whose aggregate is the mean of the uploads" in err[0]
