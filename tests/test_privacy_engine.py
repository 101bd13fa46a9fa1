"""Differential privacy inside the engine: DP-SGD reduces to plain training at sigma = 0 and
huge C, budgets hold end to end, user-level DP-FedAvg is the clipped noisy mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.privacy import epsilon
from fedlora_jax.server import device_shards, init_server_state
from fedlora_jax.simulate import run
from tiny import tiny_config, tiny_experiment

DP = {"privacy.record_level": True, "privacy.sampling": "shuffle", "privacy.noise_multiplier": 0.0,
      "privacy.clip_norm": 1e6}


def one_round(**overrides):
    exp = tiny_experiment(**overrides)
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=exp.federation)
    return exp, state, exp.federation.round(state, device_shards(exp.data))


def test_dp_sgd_with_zero_noise_and_huge_clip_equals_plain_training():
    _, _, (plain, plain_out) = one_round(**{"optim.name": "sgd", "optim.learning_rate": 0.1})
    _, _, (dp, dp_out) = one_round(**{"optim.name": "sgd", "optim.learning_rate": 0.1, **DP})
    for a, b in zip(jax.tree.leaves(plain_out.client_params), jax.tree.leaves(dp_out.client_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    np.testing.assert_allclose(plain_out.train_loss, dp_out.train_loss, atol=1e-5)


def test_dp_noise_is_the_only_difference_and_has_the_calibrated_scale():
    """One SGD step with the same keys, with and without noise: the difference of each client's
    update is -lr * N(0, (sigma C)^2) / expected batch on every trained coordinate."""
    sigma, clip, lr = 1.5, 0.5, 0.1
    step = {**DP, "privacy.clip_norm": clip, "optim.name": "sgd", "optim.learning_rate": lr,
            "optim.weight_decay": 0.0, "federation.local_steps": 1}
    exp, _, (_, clean) = one_round(**step)
    _, _, (_, noisy) = one_round(**{**step, "privacy.noise_multiplier": sigma})
    batch = exp.config.federation.batch_size
    expected = np.minimum(batch, exp.data.num_train[np.asarray(clean.cohort)]).astype(np.float64)
    z = [(np.asarray(b, np.float64) - np.asarray(a, np.float64)) * -expected.reshape((-1,) + (1,) * (a.ndim - 1))
         / (lr * sigma * clip) for a, b in zip(jax.tree.leaves(clean.client_params), jax.tree.leaves(noisy.client_params))]
    z = np.concatenate([x.ravel() for x in z])
    assert z.size > 1000
    assert np.std(z) == pytest.approx(1.0, rel=0.05) and abs(np.mean(z)) < 0.05


def test_ffa_with_dp_adds_no_noise_to_the_frozen_a():
    exp, state, (new, out) = one_round(**{"federation.method": "ffa", "privacy.record_level": True,
                                          "privacy.noise_multiplier": 2.0})
    for m in exp.federation.layout.modules:
        before, after = jax.tree.leaves(state.params), jax.tree.leaves(out.client_params)
        np.testing.assert_array_equal(np.asarray(after[m.a_index]), np.broadcast_to(before[m.a_index], after[m.a_index].shape))


def test_target_epsilon_is_never_exceeded(tmp_path):
    config = tiny_config(**{"privacy.record_level": True, "privacy.target_epsilon": 2.0, "federation.rounds": 4})
    result = run(config, tmp_path / "run", progress=False)
    eps = [h["epsilon"] for h in result.history]
    assert len(eps) == 4 and all(0 < e <= 2.0 for e in eps) and eps == sorted(eps)
    assert [h["dp_non_finite_examples"] for h in result.history] == [0] * 4  # logged each round; none here
    # the calibrated sigma spends the budget on the worst-case client taking part in every round
    ledger = result.experiment.ledger
    worst = epsilon(ledger.noise_multiplier, float(ledger.client_rates.max()), 4 * config.federation.local_steps, 1e-5)
    assert worst == pytest.approx(2.0, rel=1e-2)


def test_run_stops_before_the_round_that_would_exceed_the_budget(tmp_path):
    every_round = {"privacy.record_level": True, "privacy.noise_multiplier": 2.0, "federation.rounds": 20,
                   "federation.clients_per_round": 6}
    ledger = tiny_experiment(**every_round).ledger
    after_three = ledger.record_epsilon(np.full(6, 3))
    assert ledger.record_epsilon(np.full(6, 4)) > after_three * 1.001
    result = run(tiny_config(**every_round, **{"privacy.target_epsilon": after_three * 1.001}), tmp_path / "run",
                 progress=False)
    assert len(result.history) == 3
    assert result.history[-1]["epsilon"] == pytest.approx(after_three)
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert "round 4 would raise record-level epsilon" in summary


def test_user_level_dp_is_the_clipped_noisy_uniform_mean():
    exp, state, (new, out) = one_round(**{"privacy.user_level": True, "privacy.user_noise_multiplier": 0.0,
                                          "privacy.user_clip_norm": 1e6})
    for g, c, n in zip(jax.tree.leaves(state.params), jax.tree.leaves(out.client_params), jax.tree.leaves(new.params)):
        np.testing.assert_allclose(np.asarray(n), np.asarray(g) + np.mean(np.asarray(c) - np.asarray(g), axis=0), atol=1e-6)
    _, state, (clipped, out) = one_round(**{"privacy.user_level": True, "privacy.user_noise_multiplier": 0.0,
                                            "privacy.user_clip_norm": 1e-3})
    moved = np.sqrt(sum(float(jnp.sum(jnp.square(n - g))) for n, g in
                        zip(jax.tree.leaves(clipped.params), jax.tree.leaves(state.params))))
    assert moved <= 1e-3 + 1e-7


def test_user_level_epsilon_is_logged(tmp_path):
    result = run(tiny_config(**{"privacy.user_level": True, "privacy.user_target_epsilon": 5.0,
                                "federation.rounds": 2}), tmp_path / "run", progress=False)
    assert [h["user_epsilon"] <= 5.0 for h in result.history] == [True, True]
    assert result.history[1]["user_epsilon"] > result.history[0]["user_epsilon"] > 0


def test_user_level_dp_rejects_nonlinear_aggregation():
    with pytest.raises(ValueError, match="user-level DP needs a method that averages uploads"):
        tiny_experiment(**{"federation.method": "fra", "privacy.user_level": True, "privacy.user_noise_multiplier": 1.0})
