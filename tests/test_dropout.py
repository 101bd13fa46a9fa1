"""Drop-outs (``federation.dropout``): sampled clients train, but only the uploads that arrive
are aggregated, weights renormalised over them; a round where none arrives keeps the state and
says so; bytes and privacy follow."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.engine import device_shards, init_server_state
from fedlora_jax.run import run
from tiny import tiny_config, tiny_experiment


def _one_round(exp):
    state = init_server_state(exp.params, exp.frozen, 0, exp.federation)
    return state, jax.jit(exp.federation.round)(state, device_shards(exp.data))


def test_the_aggregate_is_the_mean_of_the_uploads_that_arrived():
    """FedIT with half the clients dropping out: the new factors are the mean of the reporting
    clients' trained factors, weighted by their example counts, renormalised over them."""
    exp = tiny_experiment(**{"federation.dropout": 0.5, "federation.clients_per_round": 6, "seed": 1})
    _, (state, out) = _one_round(exp)
    reported, taking_part = np.asarray(out.reported), np.asarray(out.cohort_mask)
    assert reported.any() and not reported.all() and np.all(taking_part[reported])
    counts = np.asarray(exp.data.num_train)[np.asarray(out.cohort)] * reported
    weights = counts / counts.sum()
    for got, trained in zip(jax.tree.leaves(state.params), jax.tree.leaves(out.client_params)):
        want = np.tensordot(weights, np.asarray(trained, np.float64), axes=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_round_where_no_upload_arrives_keeps_the_state():
    exp = tiny_experiment(**{"federation.dropout": 0.999})
    start, (state, out) = _one_round(exp)
    assert not np.asarray(out.reported).any() and np.asarray(out.cohort_mask).all()
    assert int(state.round) == 1
    for got, before in zip(jax.tree.leaves(state.params), jax.tree.leaves(start.params)):
        np.testing.assert_array_equal(got, before)


@pytest.mark.parametrize("extra", [{}, {"privacy.record_level": "true", "privacy.noise_multiplier": 1.0}])
def test_bytes_count_the_uploads_that_arrived_and_epsilon_every_sampled_client(tmp_path, extra):
    """bytes_up: the reporting clients' uploads; bytes_down: every sampled client's download.
    Record-level epsilon is charged for every sampled client (they trained), so it equals the
    run without drop-outs (which samples the same cohorts)."""
    records = {}
    for dropout in (0.0, 0.4):
        config = tiny_config(**{"federation.dropout": dropout, "federation.rounds": 4, "eval.every": 4}, **extra)
        out = tmp_path / f"d{dropout}"
        run(config, out, progress=False)
        records[dropout] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    exp = tiny_experiment()
    k = exp.federation.cohort_size
    up, down = exp.federation.communication_bytes(exp.params, exp.frozen, 0)
    reported = [r["reported"] for r in records[0.4]]
    assert any(n < k for n in reported) and "reported" not in records[0.0][0]
    for r, n in zip(records[0.4], reported):
        assert r["bytes_up"] == n * up // k and r["bytes_down"] == down
    if extra:
        assert [r["epsilon"] for r in records[0.4]] == [r["epsilon"] for r in records[0.0]]


def test_a_straggler_trains_as_a_client_with_its_own_step_budget():
    """With budgets [local_steps, 1, 2], client c's trained state (and loss) is what a trainer of
    budgets[c] local steps gives it; the masked steps leave it untouched."""
    import dataclasses

    from fedlora_jax.engine import train_clients
    from fedlora_jax.params import factor_mask

    exp = tiny_experiment()
    fed, shards = exp.federation, device_shards(exp.data)
    trainer = fed.trainer
    ids = jnp.array([0, 1, 2])
    start = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,) + x.shape), exp.params)
    keys = jax.random.split(jax.random.key(5), 3)
    mask = factor_mask(fed.layout, exp.params, 1.0, 1.0)
    args = (exp.frozen, start, shards.arrays, shards.offsets[ids], shards.num_examples[ids], keys, 0, mask)
    budgets = jnp.array([trainer.local_steps, 1, 2], jnp.int32)
    mixed, mixed_stats = train_clients(trainer, *args, budgets)
    for c, steps in enumerate(np.asarray(budgets)):
        alone, alone_stats = train_clients(dataclasses.replace(trainer, local_steps=int(steps),
                                                               schedule=trainer.schedule), *args)
        for got, want in zip(jax.tree.leaves(mixed), jax.tree.leaves(alone)):
            np.testing.assert_allclose(got[c], want[c], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mixed_stats.loss[c], alone_stats.loss[c], rtol=1e-5)


def test_stragglers_are_charged_the_steps_they_run():
    """Record-level epsilon per client follows its own step count: a straggler of 1 step per
    round spends less than a client of 3, and the logged worst case is the full clients'."""
    exp = tiny_experiment(**{"federation.client_steps": "{fraction: 0.5, steps: 1}", "privacy.record_level": "true",
                             "privacy.noise_multiplier": 1.0})
    ledger = exp.ledger
    steps = ledger.steps_per_participation
    stragglers = np.asarray(exp.federation.client_steps.stragglers(exp.data.num_clients))
    assert stragglers.any() and not stragglers.all()
    np.testing.assert_array_equal(steps, np.where(stragglers, 1, exp.config.federation.local_steps))
    once = np.ones(exp.data.num_clients, np.int64)
    eps = ledger.client_epsilons(once)
    plain = tiny_experiment(**{"privacy.record_level": "true", "privacy.noise_multiplier": 1.0}).ledger
    plain_eps = plain.client_epsilons(once)
    np.testing.assert_allclose(eps[~stragglers], plain_eps[~stragglers])
    assert np.all(eps[stragglers] < plain_eps[stragglers])
