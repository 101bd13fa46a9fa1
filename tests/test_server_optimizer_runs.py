"""Server optimisers in real runs (``federation.server_optimizer``): each round of the jitted round
equals the paper's optimiser (NumPy, :func:`test_server_optimizers.paper_step`) applied to that
round's plain aggregate; a factor the method leaves untrained never moves; a run interrupted and
resumed ends bit for bit where an uninterrupted one does (the optimiser's state is checkpointed);
a method whose aggregate is not a mean is refused with one line."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from fedlora_jax.cli import main
from fedlora_jax.engine import ServerState, device_shards
from fedlora_jax.params import leaf_names
from processes import press_ctrl_c_in_round
from rundirs import assert_same_run, final_state
from test_server_optimizers import paper_step
from tiny import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method, optimizer, options", [
    ("fedit", "adam", {"learning_rate": 0.05}),
    ("ffa", "sgd", {"learning_rate": 0.7, "momentum": 0.8}),
    ("rolora", "yogi", {"learning_rate": 0.05, "b2": 0.9}),
])
def test_each_round_is_the_papers_step_on_the_plain_aggregate(method, optimizer, options):
    settings = {"federation.method": method, "federation.devices": 1}
    optimised = tiny_experiment(**settings, **{"federation.server_optimizer.name": optimizer},
                                **{f"federation.server_optimizer.{k}": v for k, v in options.items()})
    plain = tiny_experiment(**settings)
    fed, plain_fed = optimised.federation, plain.federation
    shards = device_shards(optimised.data)
    step, plain_step = jax.jit(fed.round), jax.jit(plain_fed.round)
    state = fed.init_state(optimised.params, optimised.frozen, 3)
    names = leaf_names(state.params)
    moments = {name: None for name in names}
    untrained_seen = False
    for _ in range(4):
        before = jax.device_get(state.params)
        plain_state = ServerState(state.params, state.frozen, state.round, state.key, state.method_state)
        after = jax.device_get(plain_step(plain_state, shards)[0].params)
        state, _ = step(state, shards)
        got = jax.device_get(state.params)
        for name, old, a, new in zip(names, jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(got)):
            x, a = np.asarray(old, np.float64), np.asarray(a, np.float64)
            if np.array_equal(x, a) and name.endswith(("lora_a", "lora_b")):  # untrained this round: never moves
                np.testing.assert_array_equal(new, old, err_msg=name)
                untrained_seen = True
                continue
            want, moments[name] = paper_step(optimizer, x, moments[name], a - x, **_paper(optimizer, options))
            np.testing.assert_allclose(new, want, rtol=2e-5, atol=2e-6, err_msg=name)
    assert untrained_seen == (method != "fedit")


def _paper(optimizer, options):
    renamed = {"learning_rate": "lr", "eps": "tau"}
    return {renamed.get(k, k): v for k, v in options.items()}


SMALL = ["--set", "federation.rounds=4", "--set", "checkpoint.every=2", "--set", "eval.every=2",
         "--set", "federation.clients_per_round=3", "--set", "model.config.num_hidden_layers=1",
         "--set", "federation.local_steps=2", "--set", "eval.local=false", "--set", "data.test_examples=64",
         "--set", "data.packing=null", "--set", "federation.devices=1",
         "--set", "federation.server_optimizer.name=yogi", "--set", "federation.server_optimizer.learning_rate=0.03"]


def test_resume_restores_the_optimisers_state_bit_for_bit(tmp_path, monkeypatch, capsys):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(reference), "--quiet", *SMALL]) == 0
    moments = [k for k in final_state(reference) if k.startswith("optimizer/")]
    assert moments and any(np.any(final_state(reference)[k]) for k in moments)  # the moments are checkpointed
    with monkeypatch.context() as patch:
        press_ctrl_c_in_round(patch, 3)
        assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet", *SMALL]) == 130
    # drop the checkpoint Ctrl-C wrote after round 3, so the resume restores round 2's moments
    shutil.rmtree(out / "checkpoints" / "round_000003")
    capsys.readouterr()
    assert main(["resume", str(out), "--quiet"]) == 0
    assert "after round 2" in capsys.readouterr().err
    assert_same_run(out, reference)


def test_a_method_whose_aggregate_is_not_a_mean_is_refused_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet",
                 "--set", "federation.method=fra", "--set", "federation.server_optimizer.name=adam",
                 "--set", "federation.server_optimizer.learning_rate=0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err == ("fedlora-jax: error: config key 'federation.server_optimizer' needs a method whose aggregate is "
                   "the mean of the uploads (fedit, ffa, rolora), not 'fra'")
