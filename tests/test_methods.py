"""Every federated method inside the engine: protocol invariants on a real round (end-to-end runs of
every method from a config: tests/test_reported.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from fedlora_jax.methods import make_method
from fedlora_jax.params import leaf_names
from fedlora_jax.engine import device_shards, init_server_state
from tiny import tiny_experiment


def one_round(method, rounds_before=0, **overrides):
    """Runs rounds_before + 1 rounds; returns (experiment, state before the last round, state after, output)."""
    exp = tiny_experiment(**{"federation.method": method, **overrides})
    fed = exp.federation
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=fed)
    shards = device_shards(exp.data)
    play = jax.jit(fed.round)  # not donated: `state` stays valid
    for _ in range(rounds_before):
        state, _ = play(state, shards)
    after, out = play(state, shards)
    return exp, state, after, out


def factors(exp, params, module):
    leaves = jax.tree.leaves(params)
    return np.asarray(leaves[module.b_index], np.float64), np.asarray(leaves[module.a_index], np.float64)


def ideal_update(exp, out, module):
    """M = sum_u w_u B_u A_u over the cohort, w by example counts; [d_out, d_in]."""
    b, a = factors(exp, out.client_params, module)
    counts = exp.data.num_train[np.asarray(out.cohort)].astype(np.float64)
    w = counts / counts.sum()
    return np.einsum("u,uor,uri->oi", w, b, a)


def kernel(exp, frozen, module):
    return np.asarray(
        jax.tree.leaves(frozen)[exp.federation.folding.kernels[exp.federation.layout.modules.index(module)]],
        np.float64)


@pytest.mark.parametrize("method", ["ffa", "rolora"])
def test_frozen_factor_is_untouched_and_aggregate_is_exact(method):
    exp, before, after, out = one_round(method)
    for m in exp.federation.layout.modules:
        b0, a0 = factors(exp, before.params, m)
        b1, a1 = factors(exp, after.params, m)
        np.testing.assert_array_equal(a1, a0)  # round 0: both methods train B only
        np.testing.assert_allclose(b1 @ a1, ideal_update(exp, out, m), atol=1e-6)
        assert np.abs(b1).max() > 0


def test_rolora_trains_a_on_odd_rounds():
    exp, before, after, out = one_round("rolora", rounds_before=1)
    for m in exp.federation.layout.modules:
        b0, a0 = factors(exp, before.params, m)
        b1, a1 = factors(exp, after.params, m)
        np.testing.assert_array_equal(b1, b0)
        assert np.abs(a1 - a0).max() > 0
        np.testing.assert_allclose(b1 @ a1, ideal_update(exp, out, m), atol=1e-6)


def test_fedex_residual_makes_the_effective_update_exact():
    exp, before, after, out = one_round("fedex", rounds_before=1)
    s = exp.federation.folding.scaling
    for m in exp.federation.layout.modules:
        b1, a1 = factors(exp, after.params, m)
        effective = kernel(exp, after.frozen, m) + s * (b1 @ a1).T
        ideal = kernel(exp, before.frozen, m) + s * ideal_update(exp, out, m).T
        np.testing.assert_allclose(effective, ideal, atol=1e-5)
        assert np.abs(kernel(exp, after.frozen, m) - kernel(exp, before.frozen, m)).max() > 0


def test_flora_merges_the_stacked_product_and_restarts_adapters():
    exp, before, after, out = one_round("flora")
    s = exp.federation.folding.scaling
    for m in exp.federation.layout.modules:
        b0, a0 = factors(exp, before.params, m)
        b1, a1 = factors(exp, after.params, m)
        merged = kernel(exp, after.frozen, m) - kernel(exp, before.frozen, m)
        np.testing.assert_allclose(merged, s * (ideal_update(exp, out, m) - b0 @ a0).T + s * (b0 @ a0).T, atol=1e-5)
        np.testing.assert_array_equal(b1, 0)
        bound = 1 / np.sqrt(a1.shape[1])
        assert np.abs(a1).max() <= bound and np.abs(a1 - a0).max() > 0


@pytest.mark.slow  # quick twins: test_paths.py's FedSA resume, test_reported.py's FedSA local metrics
def test_fedsa_keeps_each_clients_b_and_shares_a():
    exp, before, after, out = one_round("fedsa", rounds_before=1)
    cohort = np.asarray(out.cohort)
    trained = jax.tree.leaves(out.client_params)
    counts = exp.data.num_train[cohort].astype(np.float64)
    w = counts / counts.sum()
    outside = np.setdiff1d(np.arange(exp.data.num_clients), cohort)
    for m, bank_before, bank_after in zip(exp.federation.layout.modules, before.method_state, after.method_state):
        np.testing.assert_allclose(np.asarray(bank_after)[cohort], np.asarray(trained[m.b_index]), atol=0)
        np.testing.assert_array_equal(np.asarray(bank_after)[outside], np.asarray(bank_before)[outside])
        _, a1 = factors(exp, after.params, m)
        np.testing.assert_allclose(a1, np.einsum("u,uri->ri", w, np.asarray(trained[m.a_index])), atol=1e-6)
    # the round after next starts each client from its own B, not the global one
    assert any(np.abs(np.asarray(bank)[cohort[0]] - np.asarray(bank)[cohort[1]]).max() > 0
               for bank in after.method_state)
    # with a zero learning rate the trained B of each cohort client is exactly its own banked B
    fed = exp.federation
    still = dataclasses.replace(fed, trainer=dataclasses.replace(fed.trainer, schedule=lambda step: 0.0))
    _, frozen_out = jax.jit(still.round)(after, device_shards(exp.data))
    cohort = np.asarray(frozen_out.cohort)
    trained, global_leaves = jax.tree.leaves(frozen_out.client_params), jax.tree.leaves(after.params)
    own_differs_from_global = False
    for m, bank in zip(fed.layout.modules, after.method_state):
        own = np.asarray(bank)[cohort]
        np.testing.assert_array_equal(np.asarray(trained[m.b_index]), own)
        own_differs_from_global |= bool(np.abs(own - np.asarray(global_leaves[m.b_index])).max() > 0)
    assert own_differs_from_global


def test_fra_product_is_the_truncated_svd_of_the_ideal_update():
    exp, before, after, out = one_round("fra", rounds_before=1)
    r = exp.config.lora.rank
    for m in exp.federation.layout.modules:
        b1, a1 = factors(exp, after.params, m)
        u, sv, vt = np.linalg.svd(ideal_update(exp, out, m))
        best = (u[:, :r] * sv[:r]) @ vt[:r]
        np.testing.assert_allclose(b1 @ a1, best, atol=1e-5 * max(1.0, np.abs(best).max()))


def test_flora_na_error_is_between_fra_and_fedit_on_the_same_uploads():
    exp, before, _, out = one_round("fedit", rounds_before=1)
    counts = exp.data.num_train[np.asarray(out.cohort)]
    w = jax.numpy.asarray(counts / counts.sum(), jax.numpy.float32)
    divergence = {}
    for method in ("fedit", "flora_na", "fra"):
        fed = tiny_experiment(**{"federation.method": method}).federation
        _, _, divergence[method] = fed.aggregate(out.client_params, w, before.round, jax.random.key(0), before.frozen)
    fedit, na, fra = (np.asarray(divergence[m]) for m in ("fedit", "flora_na", "fra"))
    assert np.all(na <= fedit + 1e-6) and na.mean() < fedit.mean()
    assert np.all(fra <= na + 1e-6)


def test_bytes_follow_each_protocol():
    exp = tiny_experiment()
    names = leaf_names(exp.params)
    sizes = {n: x.size * x.dtype.itemsize for n, x in zip(names, jax.tree.leaves(exp.params))}
    a_bytes = sum(v for n, v in sizes.items() if n.endswith("lora_a"))
    b_bytes = sum(v for n, v in sizes.items() if n.endswith("lora_b"))
    head = sum(v for n, v in sizes.items() if n.startswith("head."))
    k = exp.federation.cohort_size
    expected = {
        "fedit": (a_bytes + b_bytes + head, a_bytes + b_bytes + head),
        "ffa": (b_bytes + head, b_bytes + head),
        "fedsa": (a_bytes + head, a_bytes + head),
        "rolora": (b_bytes + head, b_bytes + head),  # round 0 sends B
        "flora": (a_bytes + b_bytes + head, k * (a_bytes + b_bytes) + head),
    }
    for method, (up, down) in expected.items():
        e = tiny_experiment(**{"federation.method": method})
        assert e.federation.communication_bytes(e.params, e.frozen, 0) == (k * up, k * down), method
    fedex = tiny_experiment(**{"federation.method": "fedex"})
    kernels = sum(jax.tree.leaves(fedex.frozen)[j].nbytes for j in fedex.federation.folding.kernels)
    assert fedex.federation.communication_bytes(fedex.params, fedex.frozen, 0)[1] == k * (
        a_bytes + b_bytes + head + kernels)


def test_unknown_method_and_options_are_rejected():
    with pytest.raises(ValueError, match="unknown method 'fedavgx'"):
        make_method("fedavgx")
    with pytest.raises(ValueError, match="unknown option"):
        make_method("fra", {"rank": 3})
    with pytest.raises(ValueError, match="switch_round"):
        make_method("fra_then_ffa", {})


def test_method_options_can_be_keyed_by_method_for_comparisons():
    keyed = {"fra_then_ffa": {"switch_round": 2}, "fra": {"split": "left"}}
    assert make_method("fedit", keyed).name == "fedit"  # no section: no options
    assert make_method("fra_then_ffa", keyed).uploads(1) == (True, True)
    assert make_method("fra_then_ffa", keyed).uploads(2) == (False, True)
    with pytest.raises(ValueError, match="mixes per-method sections"):
        make_method("fra", {"fra": {"split": "left"}, "split": "left"})


def test_fra_over_many_same_shape_modules_does_not_deadlock_on_cpu():
    """Regression: vmapping FRA over 12 modules (MiniLM's query/value) deadlocked jaxlib's CPU
    LAPACK thread pool on 2 cores; the engine maps modules one at a time on CPU. Run in a
    subprocess so a regression fails on the timeout instead of hanging the suite."""
    import subprocess
    import sys

    script = """
import jax, jax.numpy as jnp
from fedlora_jax import aggregation
from fedlora_jax.engine import map_modules
B = jax.random.normal(jax.random.key(0), (12, 10, 384, 8)); A = jax.random.normal(jax.random.key(1), (12, 10, 8, 384))
w = jnp.full((10,), 0.1)
f = jax.jit(lambda b, a: map_modules(lambda x: aggregation.fra(x[0], x[1], w, 8), (b, a)))
for _ in range(3):
    out = jax.block_until_ready(f(B, A))
print(out[0].shape)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("(12, 384, 8)")
