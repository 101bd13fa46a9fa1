"""Differential privacy inside the engine: DP-SGD reduces to plain training at sigma = 0 and
huge C, budgets hold end to end, user-level DP-FedAvg is the clipped noisy mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.privacy import epsilon
from fedlora_jax.engine import device_shards, init_server_state
from fedlora_jax.run import run
from tiny import tiny_config, tiny_experiment

DP = {"privacy.record_level": True, "privacy.sampling": "shuffle", "privacy.noise_multiplier": 0.0,
      "privacy.clip_norm": 1e6}


def one_round(**overrides):
    exp = tiny_experiment(**overrides)
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=exp.federation)
    return exp, state, jax.jit(exp.federation.round)(state, device_shards(exp.data))


@pytest.mark.slow  # quick twin: test_privacy.py::test_without_noise_or_clipping_equals_mean_gradient_of_real_examples
def test_dp_sgd_with_zero_noise_and_huge_clip_equals_plain_training():
    _, _, (plain, plain_out) = one_round(**{"optim.name": "sgd", "optim.learning_rate": 0.1})
    _, _, (dp, dp_out) = one_round(**{"optim.name": "sgd", "optim.learning_rate": 0.1, **DP})
    for a, b in zip(jax.tree.leaves(plain_out.client_params), jax.tree.leaves(dp_out.client_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    np.testing.assert_allclose(plain_out.train_loss, dp_out.train_loss, atol=1e-5)


@pytest.mark.slow  # quick twin: test_privacy.py::test_noise_std_matches_sigma_clip_over_expected_batch
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
         / (lr * sigma * clip)
         for a, b in zip(jax.tree.leaves(clean.client_params), jax.tree.leaves(noisy.client_params))]
    z = np.concatenate([x.ravel() for x in z])
    assert z.size > 1000
    assert np.std(z) == pytest.approx(1.0, rel=0.05) and abs(np.mean(z)) < 0.05


def test_ffa_with_record_and_user_level_dp_leaves_a_bit_identical():
    """FFA-LoRA under both DP modes: the clients' DP-SGD adds no noise to the frozen A, and the
    server's user-level noise goes only to what clients upload (B and the head), so A stays
    bit-identical in every client and in the global model, while B moves."""
    exp, state, (new, out) = one_round(**{"federation.method": "ffa", "privacy.record_level": True,
                                          "privacy.noise_multiplier": 2.0, "privacy.user_level": True,
                                          "privacy.user_noise_multiplier": 1.0})
    before, clients, after = (jax.tree.leaves(t) for t in (state.params, out.client_params, new.params))
    for m in exp.federation.layout.modules:
        np.testing.assert_array_equal(np.asarray(clients[m.a_index]),
                                      np.broadcast_to(before[m.a_index], clients[m.a_index].shape))
        np.testing.assert_array_equal(np.asarray(after[m.a_index]), np.asarray(before[m.a_index]))
        assert not np.array_equal(np.asarray(after[m.b_index]), np.asarray(before[m.b_index]))


@pytest.mark.slow  # quick twins: test_privacy.py::test_noise_multiplier_for_inverts_epsilon, the ledger test below
def test_target_epsilons_are_never_exceeded(tmp_path):
    """Record- and user-level targets in one run: both calibrated, logged every round, increasing
    and never above their targets."""
    config = tiny_config(**{"privacy.record_level": True, "privacy.target_epsilon": 2.0, "federation.rounds": 4,
                            "privacy.user_level": True, "privacy.user_target_epsilon": 5.0})
    result = run(config, tmp_path / "run", progress=False)
    eps = [h["epsilon"] for h in result.history]
    assert len(eps) == 4 and all(0 < e <= 2.0 for e in eps) and eps == sorted(eps)
    user = [h["user_epsilon"] for h in result.history]
    assert all(0 < e <= 5.0 for e in user) and user == sorted(user) and user[0] < user[-1]
    assert [h["dp_non_finite_examples"] for h in result.history] == [0] * 4  # logged each round; none here
    # the calibrated sigma spends the budget on the worst-case client taking part in every round
    ledger = result.experiment.ledger
    worst = epsilon(ledger.noise_multiplier, float(ledger.client_rates.max()), 4 * config.federation.local_steps, 1e-5)
    assert worst == pytest.approx(2.0, rel=1e-2)
    assert user[-1] == pytest.approx(5.0, rel=1e-2)  # likewise at the user level, over the 4 rounds


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
    """Unclipped and noiseless: the global model plus the uniform mean of the cohort's updates.
    Clipped below most clients' update norms and noised: global + (sum_u clip(update_u, S) +
    N(0, (sigma S)^2)) / K, recomputed in float64 numpy from the clients' trained states, the
    noise drawn from the round's server key as documented (split(key, 4)[3], then one key per
    leaf)."""
    user_dp = {"privacy.user_level": True, "privacy.user_noise_multiplier": 0.0, "privacy.user_clip_norm": 1e6}
    exp, state, (new, out) = one_round(**user_dp)
    k = exp.federation.expected_cohort
    assert k == exp.federation.cohort_size == 5 and np.asarray(out.cohort_mask).all()
    before = [np.asarray(g, np.float64) for g in jax.tree.leaves(state.params)]
    trained = [np.asarray(c, np.float64) for c in jax.tree.leaves(out.client_params)]
    deltas = [c - g[None] for c, g in zip(trained, before)]
    for g, d, n in zip(before, deltas, jax.tree.leaves(new.params)):
        np.testing.assert_allclose(np.asarray(n), g + d.sum(axis=0) / k, atol=1e-6)
    # each client's update norm over its whole tree; clip between the 2nd and 3rd smallest, so
    # three clients are scaled down (the largest by over 1.2x) and two are not
    norms = np.sqrt(sum(np.sum(np.square(d).reshape(d.shape[0], -1), axis=1) for d in deltas))
    clip = float(np.mean(np.sort(norms)[1:3]))
    assert np.sum(norms > clip) == 3 and norms.max() > 1.2 * clip, norms
    sigma = 0.5
    _, state, (noisy, clipped_out) = one_round(**{**user_dp, "privacy.user_clip_norm": clip,
                                                  "privacy.user_noise_multiplier": sigma})
    # the clients trained exactly as before (clipping and noise happen at the server)
    for a, b in zip(jax.tree.leaves(out.client_params), jax.tree.leaves(clipped_out.client_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scale = np.minimum(1.0, clip / norms)
    server_key = jax.random.split(state.key, 4)[3]
    leaf_keys = jax.random.split(server_key, len(before))
    noises, shifts = [], []
    for g, d, n, key in zip(before, deltas, jax.tree.leaves(noisy.params), leaf_keys):
        noise = sigma * clip * np.asarray(jax.random.normal(key, g.shape, jnp.float32), np.float64)
        clipped_sum = np.tensordot(scale, d, axes=1)
        np.testing.assert_allclose(np.asarray(n), g + (clipped_sum + noise) / k, atol=1e-6)
        noises.append(noise.ravel() / (sigma * clip))
        shifts.append((d.sum(axis=0) - clipped_sum).ravel() / k)
    # clipping moved the mean by far more than the tolerance, and the noise has std sigma * S
    assert np.sqrt(sum(np.sum(np.square(x)) for x in shifts)) > 1e-3
    noises = np.concatenate(noises)
    assert noises.size > 500 and np.std(noises) == pytest.approx(1.0, rel=0.1) and abs(np.mean(noises)) < 0.1


def test_user_level_dp_rejects_nonlinear_aggregation():
    with pytest.raises(ValueError, match="user-level DP needs a method that averages uploads"):
        tiny_experiment(**{"federation.method": "fra", "privacy.user_level": True,
                           "privacy.user_noise_multiplier": 1.0})


def _cohort_draws(federation, draws=4000):
    keys = jax.random.split(jax.random.key(11), draws)
    ids, mask, overflow = jax.jit(jax.vmap(federation.sample_cohort))(keys)
    return np.asarray(ids), np.asarray(mask), np.asarray(overflow)


@pytest.mark.parametrize("client_sampling", ["fixed", "poisson"])
def test_sampled_cohorts_follow_the_distribution_the_accountant_assumes(client_sampling):
    """Fixed: exactly K distinct clients, each with probability K / U. Poisson: each client
    independently with probability q = K / U, so cohort sizes are Binomial(U, q)."""
    from scipy.stats import binom, chisquare

    clients, cohort = 40, 8
    exp = tiny_experiment(**{"data.num_clients": clients, "federation.clients_per_round": cohort,
                             "privacy.user_level": True, "privacy.user_noise_multiplier": 1.0,
                             "privacy.client_sampling": client_sampling})
    ids, mask, overflow = _cohort_draws(exp.federation)
    sizes = mask.sum(axis=1)
    for row, row_mask in zip(ids[:200], mask[:200]):
        assert len(set(row[row_mask].tolist())) == row_mask.sum()  # distinct clients
        assert np.all(np.diff(row_mask.astype(int)) <= 0)  # taking part first
    inclusion = np.bincount(ids[mask], minlength=clients) / len(ids)
    assert np.all(np.abs(inclusion - cohort / clients) < 5 * np.sqrt(0.2 * 0.8 / len(ids)))
    if client_sampling == "fixed":
        assert np.all(sizes == cohort) and not overflow.any()
        return
    q = cohort / clients
    assert exp.federation.cohort_size == exp.ledger.cohort_slots > cohort and not overflow.any()
    assert exp.federation.expected_cohort == pytest.approx(cohort)
    edges = [0, 5, 6, 7, 8, 9, 10, 11, 13, clients + 1]  # size bins of >= 100 expected draws each
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(binom.cdf(np.array(edges) - 1, clients, q)) * len(sizes)
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_poisson_cohorts_preview_mask_and_fixed_denominator():
    """Poisson cohorts over 12 rounds: the host preview (next_cohort) is the cohort each compiled
    round trains; sizes vary; with no noise and no clipping the new global model is the old one
    plus the taking-part clients' updates summed and divided by q U (= 3), not by their count."""
    exp = tiny_experiment(**{"privacy.user_level": True, "privacy.user_noise_multiplier": 0.0,
                             "privacy.user_clip_norm": 1e6, "privacy.client_sampling": "poisson",
                             "federation.clients_per_round": 3, "federation.local_steps": 1})
    fed = exp.federation
    state, shards = init_server_state(exp.params, exp.frozen, seed=5, federation=fed), device_shards(exp.data)
    round_fn = jax.jit(fed.round)
    sizes = []
    for _ in range(12):
        preview = fed.next_cohort(state)
        new, out = round_fn(state, shards)
        cohort, mask = np.asarray(out.cohort), np.asarray(out.cohort_mask)
        np.testing.assert_array_equal(preview, cohort[mask])
        for g, c, n in zip(jax.tree.leaves(state.params), jax.tree.leaves(out.client_params),
                           jax.tree.leaves(new.params)):
            update = (np.asarray(c, np.float64) - np.asarray(g, np.float64))[mask].sum(axis=0) / 3.0
            np.testing.assert_allclose(np.asarray(n), np.asarray(g) + update, atol=1e-6)
        sizes.append(int(mask.sum()))
        state = new
    assert len(set(sizes)) > 1 and 0 < min(sizes) and max(sizes) < fed.cohort_size


def test_ledger_epsilon_delta_and_overflows_against_independent_computations(tmp_path):
    """One DP run, 2 of 6 clients per round (participations differ) and a buffer sized to
    overflow often. Every round: the logged epsilon is the worst client's, each client's
    recomputed with dp-accounting from the cohorts the run sampled; the logged delta adds each
    client's (1 + e^eps_u) * steps_u * P(overflow_u) (Binomial(n_u + 1, q_u) tail); and the
    counted overflows are as many as the binomial tail of the run's own data predicts."""
    import dp_accounting
    from scipy.stats import binom

    sigma = 1.2
    config = tiny_config(**{"privacy.record_level": True, "privacy.noise_multiplier": sigma,
                            "privacy.overflow_probability": 0.3, "data.examples_per_client": [30, 40],
                            "federation.clients_per_round": 2, "federation.rounds": 6, "eval.local": False})
    result = run(config, tmp_path / "run", progress=False)
    exp, f = result.experiment, config.federation
    fed, ledger, key = exp.federation, exp.ledger, jax.random.key(config.seed)
    n = exp.data.num_train
    rates = np.minimum(1.0, f.batch_size / n)
    participations = np.zeros(6, np.int64)
    for record in result.history:
        key, cohort_key, _, _ = fed.split_key(key)
        ids, mask, _ = fed.sample_cohort(cohort_key)
        participations[np.asarray(ids)[np.asarray(mask)]] += 1
        steps = participations * f.local_steps
        eps = np.zeros(6)
        for u in np.flatnonzero(participations):
            accountant = dp_accounting.rdp.RdpAccountant()
            event = dp_accounting.PoissonSampledDpEvent(float(rates[u]), dp_accounting.GaussianDpEvent(sigma))
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(steps[u])))
            eps[u] = accountant.get_epsilon(1e-5)
        neighbour = binom.sf(ledger.record_buffer, n + 1, rates)
        deltas = np.minimum(1.0, 1e-5 + (1 + np.exp(eps)) * steps * neighbour)
        assert record["epsilon"] == pytest.approx(eps.max(), rel=1e-9)
        assert record["delta"] == pytest.approx(deltas.max(), rel=1e-9)
    assert len(set(participations.tolist())) > 1
    np.testing.assert_array_equal(ledger.participations, participations)
    expected = np.sum(participations * f.local_steps * binom.sf(ledger.record_buffer, n, rates))
    counted = sum(h["dp_buffer_overflows"] for h in result.history)
    assert expected > 5 and abs(counted - expected) < 4 * np.sqrt(expected)
    assert result.history[-1]["delta"] > 1e-4
