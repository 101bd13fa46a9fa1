"""Tests of fedlora_jax.privacy: accounting, DP-SGD, sampling and user-level DP-FedAvg."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedlora_jax import privacy

# ---------------------------------------------------------------- accounting

# Published TF-Privacy compute_dp_sgd_privacy results (RDP, add-or-remove-one).
TF_PRIVACY_CASES = [
    # n, batch, sigma, epochs, delta, epsilon
    (60000, 150, 1.3, 15, 1e-5, 0.7242),
    (100000, 100, 1.0, 30, 1e-7, 1.4155),
]


@pytest.mark.parametrize("n, batch, sigma, epochs, delta, expected", TF_PRIVACY_CASES)
def test_epsilon_reproduces_tf_privacy_and_pld_is_tighter(n, batch, sigma, epochs, delta, expected):
    q, steps = batch / n, epochs * n // batch
    rdp_epsilon = privacy.epsilon(sigma, q, steps, delta)
    assert rdp_epsilon == pytest.approx(expected, abs=1e-3)
    pld_epsilon = privacy.epsilon(sigma, q, steps, delta, accountant="pld")
    assert 0.0 < pld_epsilon < rdp_epsilon


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_multiplier_for_inverts_epsilon(accountant):
    q, steps, delta = 150 / 60000, 6000, 1e-5
    target = privacy.epsilon(1.3, q, steps, delta, accountant)
    sigma = privacy.noise_multiplier_for(target, q, steps, delta, accountant)
    assert sigma == pytest.approx(1.3, rel=0.01)
    achieved = privacy.epsilon(sigma, q, steps, delta, accountant)
    assert achieved <= target * (1 + 1e-9)
    assert achieved == pytest.approx(target, rel=0.01)


def test_epsilon_edge_cases():
    assert privacy.epsilon(0.0, 0.01, 10, 1e-5) == math.inf
    assert privacy.epsilon(0.0, 0.01, 10, 1e-5, accountant="pld") == math.inf
    assert privacy.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert privacy.noise_multiplier_for(1.0, 0.01, 0, 1e-5) == 0.0
    full_batch = privacy.epsilon(1.0, 1.0, 10, 1e-5)
    assert math.isfinite(full_batch) and full_batch > privacy.epsilon(1.0, 0.5, 10, 1e-5)
    assert privacy.epsilon(2.0, 0.01, 100, 1e-5) < privacy.epsilon(1.0, 0.01, 100, 1e-5)


def _rdp_to_epsilon(orders, rdp, delta):
    """dp-accounting's RDP -> (epsilon, delta) conversion (Canonne, Kamath, Steinke 2020, Prop. 12),
    written out here: min over orders of rdp - (log delta + log a) / (a - 1) + log((a - 1) / a)."""
    orders = np.asarray(orders, np.float64)
    return float(np.min(rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)))


def _poisson_gaussian_rdp(q, sigma, order):
    """RDP of the Poisson-subsampled Gaussian at an integer order (Mironov, Talwar, Zhang 2019):
    log(sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2))) / (a - 1), in log space."""
    from scipy.special import gammaln, logsumexp

    k = np.arange(order + 1)
    log_binom = gammaln(order + 1) - gammaln(k + 1) - gammaln(order - k + 1)
    terms = log_binom + (order - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma**2)
    return logsumexp(terms) / (order - 1)


def test_user_level_epsilon_poisson_cohorts_match_an_independent_rdp_computation():
    sigma, clients, cohort, rounds, delta = 1.1, 400, 20, 200, 1e-6
    orders = np.arange(2, 257)
    rdp = rounds * np.array([_poisson_gaussian_rdp(cohort / clients, sigma, a) for a in orders])
    independent = _rdp_to_epsilon(orders, rdp, delta)
    ours = privacy.user_level_epsilon(sigma, clients, cohort, rounds, delta, "rdp", "poisson")
    # dp-accounting also searches fractional orders, so it may only be (slightly) tighter
    assert independent * 0.97 <= ours <= independent + 1e-9


@pytest.mark.parametrize("client_sampling, sensitivity", [("poisson", 1.0), ("fixed", 2.0)])
def test_user_level_epsilon_every_client_every_round_is_the_gaussian_mechanism(client_sampling, sensitivity):
    """K = U: no sampling, T Gaussian releases of a sum whose sensitivity is S under add/remove
    (Poisson cohorts) and 2 S under replace-one (fixed cohorts): RDP T a (sens / sigma)^2 / 2."""
    sigma, clients, rounds, delta = 4.0, 50, 10, 1e-5
    orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 257)])
    rdp = rounds * orders * sensitivity**2 / (2 * sigma**2)
    ours = privacy.user_level_epsilon(sigma, clients, clients, rounds, delta, "rdp", client_sampling)
    assert ours == pytest.approx(_rdp_to_epsilon(orders, rdp, delta), rel=0.02)


def _without_replacement_gaussian_rdp(gamma, sigma, order):
    """RDP at an integer order >= 2 of the Gaussian mechanism (noise multiplier sigma: RDP
    a / (2 sigma^2), infinite at a = inf) on a uniformly drawn subset of a fixed fraction gamma of
    the data, under replace-one neighbours: Wang, Balle and Kasiviswanathan (2019), Theorem 9,
    log(1 + gamma^2 C(a, 2) min(4 (e^eps(2) - 1), 2 e^eps(2))
          + sum_{j=3..a} 2 gamma^j C(a, j) e^((j - 1) eps(j))) / (a - 1), in log space."""
    from scipy.special import gammaln, logsumexp

    def gaussian_rdp(a):
        return a / (2 * sigma**2)

    def log_binom(n, k):
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    second = 2 * np.log(gamma) + log_binom(order, 2) + min(np.log(4) + np.log(np.expm1(gaussian_rdp(2))),
                                                           np.log(2) + gaussian_rdp(2))
    j = np.arange(3, order + 1)
    higher = np.log(2) + j * np.log(gamma) + log_binom(order, j) + (j - 1) * gaussian_rdp(j)
    return logsumexp(np.concatenate([[0.0, second], higher])) / (order - 1)


FIXED_COHORT_CASES = [  # sigma, U, K < U, rounds, delta
    (1.1, 400, 20, 200, 1e-6),
    (2.0, 100, 10, 50, 1e-5),
    (3.0, 50, 25, 20, 1e-5),
]


@pytest.mark.parametrize("sigma, clients, cohort, rounds, delta", FIXED_COHORT_CASES)
def test_user_level_epsilon_fixed_cohorts_match_an_independent_rdp_computation(sigma, clients, cohort, rounds,
                                                                               delta):
    """K < U clients drawn without replacement, replace-one neighbours: each round is the Gaussian
    mechanism with noise multiplier sigma / 2 (replacing one client moves the clipped sum by up
    to 2 S) on a uniform K-subset of the U clients, composed over the rounds."""
    import dp_accounting
    from dp_accounting import rdp as dp_rdp

    orders = np.arange(2, 257)
    rdp = rounds * np.array([_without_replacement_gaussian_rdp(cohort / clients, sigma / 2, a) for a in orders])
    independent = _rdp_to_epsilon(orders, rdp, delta)
    ours = privacy.user_level_epsilon(sigma, clients, cohort, rounds, delta, "rdp", "fixed")
    # dp-accounting uses the paper's tighter Theorem 27 and fractional orders too: it may only be
    # (slightly) tighter than the Theorem 9 bound
    assert independent * 0.97 <= ours <= independent * (1 + 1e-9)
    # ... and it is exactly the event docs/privacy.md names, composed in dp-accounting directly
    accountant = dp_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(clients, cohort, dp_accounting.GaussianDpEvent(sigma / 2)),
        rounds))
    assert ours == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    # sampling K of U is cheaper than taking every client every round (same relation and noise)
    assert ours < privacy.user_level_epsilon(sigma, clients, clients, rounds, delta, "rdp", "fixed")


def test_ledger_logs_the_independent_fixed_cohort_epsilon_every_round():
    """A run's ledger with user-level DP on fixed cohorts of K = 10 of U = 100 clients logs, after
    each round r, the epsilon of r rounds of the without-replacement Gaussian (computed here),
    its delta unchanged (no overflow), whichever clients took part."""
    from fedlora_jax.config import PrivacyConfig
    from fedlora_jax.privacy.ledger import PrivacyLedger

    sigma, clients, cohort, delta = 2.0, 100, 10, 1e-5
    config = PrivacyConfig(user_level=True, user_noise_multiplier=sigma, client_sampling="fixed", delta=delta)
    ledger = PrivacyLedger.create(config, np.full(clients, 20), batch_size=8, local_steps=2, rounds=4,
                                  cohort_size=cohort)
    assert ledger.cohort_slots == cohort
    rng = np.random.default_rng(0)
    orders = np.arange(2, 257)
    per_round = np.array([_without_replacement_gaussian_rdp(cohort / clients, sigma / 2, a) for a in orders])
    logged = []
    for r in range(1, 5):
        out = ledger.commit(rng.choice(clients, size=cohort, replace=False))
        independent = _rdp_to_epsilon(orders, r * per_round, delta)
        assert independent * 0.97 <= out["user_epsilon"] <= independent * (1 + 1e-9)
        assert out["user_delta"] == delta
        logged.append(out["user_epsilon"])
    assert logged == sorted(logged) and logged[0] < logged[-1]


def test_user_level_fixed_cohorts_need_rdp_and_calibrate():
    with pytest.raises(ValueError, match="PLD accountant cannot account fixed-size cohorts"):
        privacy.user_level_epsilon(1.0, 100, 10, 5, 1e-5, "pld", "fixed")
    sigma = privacy.user_level_noise_multiplier_for(3.0, 100, 10, 50, 1e-5, "rdp", "fixed")
    assert privacy.user_level_epsilon(sigma, 100, 10, 50, 1e-5, "rdp", "fixed") <= 3.0
    assert privacy.user_level_epsilon(sigma - 1e-3, 100, 10, 50, 1e-5, "rdp", "fixed") > 3.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(sampling_rate=0.0), "sampling_rate"),
        (dict(sampling_rate=1.5), "sampling_rate"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(accountant="moments"), "accountant"),
    ],
)
def test_epsilon_rejects_bad_input(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=message):
        privacy.epsilon(**args)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf])
def test_noise_multiplier_for_rejects_bad_target(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        privacy.noise_multiplier_for(target, 0.01, 10, 1e-5)


# ---------------------------------------------------------------- DP-SGD

D_IN, D_OUT, RANK, BATCH = 5, 3, 2, 6


def make_params(key):
    key_a, key_b, key_h = jax.random.split(key, 3)
    return {
        "lora_a": jax.random.normal(key_a, (RANK, D_IN)),
        "lora_b": jax.random.normal(key_b, (D_OUT, RANK)),
        "head": jax.random.normal(key_h, (D_OUT,)),
    }


def make_batch(key, size=BATCH, scale=1.0):
    key_x, key_y = jax.random.split(key)
    return {"x": scale * jax.random.normal(key_x, (size, D_IN)), "y": jax.random.normal(key_y, (size, D_OUT))}


def example_loss(params, example):
    prediction = params["lora_b"] @ (params["lora_a"] @ example["x"]) + params["head"]
    return 0.5 * jnp.sum((prediction - example["y"]) ** 2)


def tree_allclose(a, b, **tolerances):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.allclose(x, y, **tolerances)), a, b)))


def test_without_noise_or_clipping_equals_mean_gradient_of_real_examples():
    params, batch = make_params(jax.random.key(0)), make_batch(jax.random.key(1))
    mask = jnp.array([1, 1, 0, 1, 0, 1], jnp.float32)
    noisy, stats = privacy.private_gradient(
        example_loss, params, batch, mask, jax.random.key(2),
        clip_norm=1e9, noise_multiplier=0.0, expected_batch_size=4,
    )

    def mean_loss(p):
        losses = jax.vmap(example_loss, in_axes=(None, 0))(p, batch)
        return jnp.sum(losses * mask) / 4

    assert tree_allclose(noisy, jax.grad(mean_loss)(params), rtol=1e-5, atol=1e-6)
    assert float(stats.num_examples) == 4.0
    assert float(stats.fraction_clipped) == 0.0
    assert float(stats.mean_loss) == pytest.approx(float(mean_loss(params)), rel=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
def test_clipping_bounds_each_example_contribution(per_layer):
    params = make_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1), scale=1e3)
    mask = jnp.array([1, 1, 1, 0, 1, 0], jnp.float32)
    clip_norm, expected = 0.5, 5.0
    kwargs = dict(
        clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=expected, per_layer=per_layer
    )
    noisy, stats = privacy.private_gradient(example_loss, params, batch, mask, jax.random.key(2), **kwargs)
    assert float(privacy.tree_l2_norm(noisy)) <= clip_norm * 4 / expected * (1 + 1e-5)
    assert float(stats.fraction_clipped) == 1.0
    assert float(stats.mean_grad_norm) > 100 * clip_norm
    single, _ = privacy.private_gradient(
        example_loss, params, batch, jnp.array([1, 0, 0, 0, 0, 0.0]), jax.random.key(2), **kwargs
    )
    if per_layer:  # every leaf is clipped to C / sqrt(3) exactly
        for leaf in jax.tree.leaves(single):
            leaf_norm = float(jnp.linalg.norm(leaf)) * expected
            assert leaf_norm == pytest.approx(clip_norm / math.sqrt(3), rel=1e-4)
    else:
        assert float(privacy.tree_l2_norm(single)) * expected == pytest.approx(clip_norm, rel=1e-4)


def test_noise_std_matches_sigma_clip_over_expected_batch():
    params = {"w": jnp.zeros((40, 25)), "v": jnp.zeros((100,))}
    batch = {"x": jnp.ones((4, 3))}
    sigma, clip_norm, expected = 1.5, 2.0, 8.0

    @jax.jit
    @jax.vmap
    def noise_draw(key):
        noisy, _ = privacy.private_gradient(
            lambda p, ex: 0.0 * jnp.sum(p["w"]) + 0.0 * jnp.sum(p["v"]) * jnp.sum(ex["x"]),
            params, batch, jnp.ones(4), key,
            clip_norm=clip_norm, noise_multiplier=sigma, expected_batch_size=expected,
        )
        return noisy

    draws = noise_draw(jax.random.split(jax.random.key(0), 64))
    target = sigma * clip_norm / expected
    for leaf in jax.tree.leaves(draws):
        assert float(jnp.std(leaf)) == pytest.approx(target, rel=0.05)
        assert abs(float(jnp.mean(leaf))) < 0.05 * target
    # Leaves and draws are independent: no correlation between the first coords of w and v.
    w_first, v_first = draws["w"].reshape(64, -1)[:, :100], draws["v"]
    assert abs(float(jnp.corrcoef(w_first.ravel(), v_first.ravel())[0, 1])) < 0.05


def test_padding_examples_do_not_change_the_update():
    params, batch = make_params(jax.random.key(0)), make_batch(jax.random.key(1))
    mask = jnp.array([1, 0, 1, 0, 1, 0], jnp.float32)
    garbage = {
        "x": batch["x"].at[1].set(jnp.nan).at[3].set(1e30).at[5].set(-7.0),
        "y": batch["y"].at[1].set(jnp.inf).at[3].set(3.0),
    }
    kwargs = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=3)
    key = jax.random.key(5)
    clean, clean_stats = privacy.private_gradient(example_loss, params, batch, mask, key, **kwargs)
    dirty, dirty_stats = privacy.private_gradient(example_loss, params, garbage, mask, key, **kwargs)
    assert tree_allclose(clean, dirty, rtol=0, atol=0)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(dirty))
    assert tree_allclose(clean_stats, dirty_stats, rtol=0, atol=0)


def test_non_finite_example_gradients_are_zeroed_and_counted():
    params, batch = make_params(jax.random.key(0)), make_batch(jax.random.key(1))
    mask = jnp.array([1, 1, 1, 0, 1, 1], jnp.float32)
    broken = {"x": batch["x"].at[2].set(jnp.nan).at[3].set(jnp.nan), "y": batch["y"].at[4].set(jnp.inf)}
    kwargs = dict(clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=5)
    noisy, stats = privacy.private_gradient(example_loss, params, broken, mask, jax.random.key(5), **kwargs)
    assert int(stats.num_non_finite) == 2  # rows 2 and 4; row 3 is padding
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(noisy))
    _, clean_stats = privacy.private_gradient(example_loss, params, batch, mask, jax.random.key(5), **kwargs)
    assert int(clean_stats.num_non_finite) == 0


def test_grad_mask_freezes_leaf_without_gradient_noise_or_clipping_share():
    params, batch = make_params(jax.random.key(0)), make_batch(jax.random.key(1), scale=10.0)
    mask = jnp.ones(BATCH)
    grad_mask = {"lora_a": 0.0, "lora_b": jnp.ones((D_OUT, RANK)), "head": 1.0}
    noisy, _ = privacy.private_gradient(
        example_loss, params, batch, mask, jax.random.key(3),
        clip_norm=1.0, noise_multiplier=2.0, expected_batch_size=BATCH, grad_mask=grad_mask,
    )
    assert float(jnp.max(jnp.abs(noisy["lora_a"]))) == 0.0
    assert float(jnp.min(jnp.abs(noisy["lora_b"]))) > 0.0

    # Without noise, clipping sees only the unmasked leaves' norm.
    clip_norm = 1.0
    clipped, stats = privacy.private_gradient(
        example_loss, params, batch, mask, jax.random.key(3),
        clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=1.0, grad_mask=grad_mask,
    )
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)
    trainable_norms = jnp.sqrt(
        jnp.sum(grads["lora_b"] ** 2, axis=(1, 2)) + jnp.sum(grads["head"] ** 2, axis=1)
    )
    scales = jnp.minimum(1.0, clip_norm / trainable_norms)
    expected_b = jnp.tensordot(scales, grads["lora_b"], axes=1)
    assert np.allclose(clipped["lora_b"], expected_b, rtol=1e-5)
    assert float(stats.mean_grad_norm) == pytest.approx(float(jnp.mean(trainable_norms)), rel=1e-5)


def test_per_layer_clip_counts_only_unmasked_leaves():
    params, batch = make_params(jax.random.key(0)), make_batch(jax.random.key(1), scale=1e3)
    single = jnp.array([1, 0, 0, 0, 0, 0.0])
    grad_mask = {"lora_a": 0.0, "lora_b": 1.0, "head": 1.0}
    clipped, _ = privacy.private_gradient(
        example_loss, params, batch, single, jax.random.key(0),
        clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0, per_layer=True, grad_mask=grad_mask,
    )
    assert float(jnp.linalg.norm(clipped["lora_b"])) == pytest.approx(1 / math.sqrt(2), rel=1e-4)
    assert float(privacy.tree_l2_norm(clipped)) == pytest.approx(1.0, rel=1e-4)


def test_vmap_over_clients_equals_per_client_calls():
    clients = 3
    params = jax.vmap(make_params)(jax.random.split(jax.random.key(0), clients))
    batches = jax.vmap(make_batch)(jax.random.split(jax.random.key(1), clients))
    masks = jnp.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.float32)
    keys = jax.random.split(jax.random.key(2), clients)

    def client_step(p, b, m, k):
        return privacy.private_gradient(
            example_loss, p, b, m, k, clip_norm=0.7, noise_multiplier=0.8, expected_batch_size=4.0
        )

    stacked, stacked_stats = jax.jit(jax.vmap(client_step))(params, batches, masks, keys)
    for u in range(clients):
        one, one_stats = jax.jit(client_step)(*jax.tree.map(lambda x: x[u], (params, batches, masks, keys)))
        assert tree_allclose(jax.tree.map(lambda x: x[u], stacked), one, rtol=1e-5, atol=1e-6)
        assert tree_allclose(jax.tree.map(lambda x: x[u], stacked_stats), one_stats, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
def test_matches_jax_privacy_clipped_grad():
    import jax_privacy  # test extra: jax-privacy>=2.0

    params, batch = make_params(jax.random.key(0)), make_batch(jax.random.key(1), scale=3.0)
    mask = jnp.array([1, 1, 0, 1, 1, 0], bool)
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)
    clip_norm = float(np.median(jax.vmap(privacy.tree_l2_norm)(grads)))  # clips about half
    reference_fn = jax_privacy.clipped_grad(example_loss, l2_clip_norm=clip_norm, keep_batch_dim=False)
    reference = reference_fn(params, batch, is_padding_example=~mask)
    ours, stats = privacy.private_gradient(
        example_loss, params, batch, mask, jax.random.key(0),
        clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=1.0,
    )
    assert 0.0 < float(stats.fraction_clipped) < 1.0
    assert tree_allclose(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(noise_multiplier=-0.1), "noise_multiplier"),
        (dict(expected_batch_size=0), "expected_batch_size"),
    ],
)
def test_private_gradient_rejects_bad_input(kwargs, message):
    args = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0) | kwargs
    with pytest.raises(ValueError, match=message):
        privacy.private_gradient(
            example_loss, make_params(jax.random.key(0)), make_batch(jax.random.key(1)),
            jnp.ones(BATCH), jax.random.key(2), **args,
        )


# ---------------------------------------------------------------- sampling


def test_poisson_sample_inclusion_rate_and_range():
    max_examples, num_examples, rate, buffer = 50, 20, 0.3, 20
    draws = 4000
    indices, masks, overflows = jax.jit(
        jax.vmap(lambda k: privacy.poisson_sample(k, num_examples, rate, buffer, max_examples))
    )(jax.random.split(jax.random.key(0), draws))
    indices, masks = np.asarray(indices), np.asarray(masks)
    assert not np.asarray(overflows).any()  # 20 slots hold every sample of 20 examples
    assert indices.shape == (draws, buffer) and indices.dtype == np.int32
    sampled = indices[masks]
    assert sampled.max() < num_examples and sampled.min() >= 0
    counts = np.bincount(sampled, minlength=num_examples) / draws
    # Per-index inclusion rate: binomial std sqrt(0.3 * 0.7 / 4000) ~ 0.0072; allow 5 std.
    assert np.all(np.abs(counts - rate) < 0.036)
    assert masks.sum(axis=1).mean() == pytest.approx(rate * num_examples, rel=0.03)
    # Included examples come first and are distinct within a draw.
    assert np.all(np.diff(masks.astype(int), axis=1) <= 0)
    for row, row_mask in zip(indices[:100], masks[:100]):
        assert len(set(row[row_mask])) == row_mask.sum()


def test_poisson_sample_per_client_rates_under_vmap():
    num_examples = jnp.array([10, 40])
    rates = 4.0 / num_examples  # the same expected batch of 4 from clients of different sizes

    def sample(key):
        return jax.vmap(lambda k, n, q: privacy.poisson_sample(k, n, q, 16, 40))(
            jax.random.split(key, 2), num_examples, rates
        )

    indices, masks, _ = jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(1), 3000))
    mean_counts = np.asarray(masks).sum(axis=-1).mean(axis=0)
    assert np.allclose(mean_counts, 4.0, rtol=0.05)
    assert np.asarray(indices)[:, 0][np.asarray(masks)[:, 0]].max() < 10


def test_poisson_sample_truncates_and_pads():
    indices, mask, overflow = privacy.poisson_sample(jax.random.key(0), 30, 1.0, 8, 30)
    assert bool(mask.all()) and len(set(np.asarray(indices).tolist())) == 8 and bool(overflow)
    indices, mask, overflow = privacy.poisson_sample(jax.random.key(0), 3, 1.0, 8, 5)
    assert not bool(overflow)
    assert np.asarray(mask).tolist() == [True] * 3 + [False] * 5
    assert sorted(np.asarray(indices)[:3].tolist()) == [0, 1, 2]
    assert np.asarray(indices).max() < 5


@pytest.mark.parametrize("expected_batch", [1.0, 16.0, 64.0, 500.0])
def test_poisson_buffer_size_bounds_overflow(expected_batch):
    buffer = privacy.poisson_buffer_size(expected_batch)
    num_examples = 100_000
    exact_tail = scipy_stats.binom.sf(buffer, num_examples, expected_batch / num_examples)
    assert exact_tail < 1e-6
    smallest_sufficient = int(scipy_stats.binom.isf(1e-6, num_examples, expected_batch / num_examples))
    assert buffer <= 1.25 * smallest_sufficient + 3
    assert privacy.poisson_buffer_size(expected_batch, max_examples=10) == min(buffer, 10)


def test_poisson_buffer_size_rejects_bad_input():
    with pytest.raises(ValueError, match="expected_batch_size"):
        privacy.poisson_buffer_size(-1.0)
    with pytest.raises(ValueError, match="overflow_probability"):
        privacy.poisson_buffer_size(8.0, overflow_probability=0.0)


def test_shuffled_batch_draws_distinct_real_examples():
    indices, mask = jax.jit(lambda k: privacy.shuffled_batch(k, 12, 5, 20))(jax.random.key(0))
    assert bool(mask.all())
    assert len(set(np.asarray(indices).tolist())) == 5 and np.asarray(indices).max() < 12
    indices, mask = privacy.shuffled_batch(jax.random.key(1), 3, 5, 20)
    assert np.asarray(mask).tolist() == [True] * 3 + [False] * 2
    assert sorted(np.asarray(indices)[:3].tolist()) == [0, 1, 2]
    first_index = jax.vmap(lambda k: privacy.shuffled_batch(k, 12, 5, 20)[0][0])
    firsts = first_index(jax.random.split(jax.random.key(2), 2400))
    frequencies = np.bincount(np.asarray(firsts), minlength=12) / 2400
    assert np.all(np.abs(frequencies - 1 / 12) < 0.03)


@pytest.mark.parametrize("bad", [0, -3, 2.0])
def test_samplers_reject_non_static_sizes(bad):
    with pytest.raises(ValueError, match="buffer_size"):
        privacy.poisson_sample(jax.random.key(0), 5, 0.5, bad, 10)
    with pytest.raises(ValueError, match="batch_size"):
        privacy.shuffled_batch(jax.random.key(0), 5, bad, 10)


# ---------------------------------------------------------------- user-level DP-FedAvg


def make_updates(key, clients=4):
    key_b, key_a = jax.random.split(key)
    return {
        "lora_b": jax.random.normal(key_b, (clients, D_OUT, RANK)),
        "lora_a": jax.random.normal(key_a, (clients, RANK, D_IN)),
    }


def test_clip_update_bounds_norm_and_keeps_small_updates():
    update = jax.tree.map(lambda x: x[0], make_updates(jax.random.key(0)))
    norm = float(privacy.tree_l2_norm(update))
    clipped = privacy.clip_update(update, norm / 4)
    assert float(privacy.tree_l2_norm(clipped)) == pytest.approx(norm / 4, rel=1e-5)
    assert tree_allclose(privacy.clip_update(update, 2 * norm), update, rtol=0, atol=0)
    with pytest.raises(ValueError, match="clip_norm"):
        privacy.clip_update(update, -1.0)


def test_noisy_mean_without_noise_clips_each_client():
    updates = make_updates(jax.random.key(0))
    updates = jax.tree.map(lambda x: x.at[2].multiply(1e4), updates)  # one outlier client
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    clip_norm = 1e5
    mean = privacy.noisy_mean_of_updates(updates, weights, clip_norm, 0.0, jax.random.key(1), 3.0)
    plain = jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1) / 3.0, updates)
    assert tree_allclose(mean, plain, rtol=1e-5)

    clip_norm = 0.5
    mean = privacy.noisy_mean_of_updates(updates, weights, clip_norm, 0.0, jax.random.key(1), 3.0)
    assert float(privacy.tree_l2_norm(mean)) <= clip_norm * 3 / 3.0 * (1 + 1e-5)
    outlier_only = privacy.noisy_mean_of_updates(
        updates, jnp.array([0.0, 0.0, 1.0, 0.0]), clip_norm, 0.0, jax.random.key(1), 1.0
    )
    assert float(privacy.tree_l2_norm(outlier_only)) == pytest.approx(clip_norm, rel=1e-5)
    # Weights above 1 are clamped: the outlier still contributes at most S.
    heavy = privacy.noisy_mean_of_updates(
        updates, jnp.array([0.0, 0.0, 50.0, 0.0]), clip_norm, 0.0, jax.random.key(1), 1.0
    )
    assert float(privacy.tree_l2_norm(heavy)) == pytest.approx(clip_norm, rel=1e-5)


def test_noisy_mean_noise_std_matches():
    updates = jax.tree.map(jnp.zeros_like, make_updates(jax.random.key(0), clients=5))
    updates = {"w": jnp.zeros((5, 50, 40))} | updates
    sigma, clip_norm, expected = 1.2, 0.8, 4.0
    draws = jax.jit(
        jax.vmap(lambda k: privacy.noisy_mean_of_updates(updates, jnp.ones(5), clip_norm, sigma, k, expected))
    )(jax.random.split(jax.random.key(3), 40))
    assert float(jnp.std(draws["w"])) == pytest.approx(sigma * clip_norm / expected, rel=0.05)
    assert draws["lora_b"].shape == (40, D_OUT, RANK)


def test_noisy_mean_rejects_bad_input():
    updates = make_updates(jax.random.key(0))
    with pytest.raises(ValueError, match="expected_clients"):
        privacy.noisy_mean_of_updates(updates, jnp.ones(4), 1.0, 1.0, jax.random.key(0), 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privacy.noisy_mean_of_updates(updates, jnp.ones(4), 1.0, -1.0, jax.random.key(0), 4.0)


def test_client_poisson_buffer_size_is_the_exact_binomial_quantile():
    from scipy.stats import binom

    from fedlora_jax.privacy import client_poisson_buffer_size

    counts = np.array([64, 64, 200, 20])
    buffer = client_poisson_buffer_size(counts, 16, 1e-6)
    rates = np.minimum(1.0, 16 / counts)
    # the bound holds for each client's data and for its add-one neighbour (n + 1 examples)
    assert all(binom.sf(buffer, n + 1, q) <= 1e-6 for n, q in zip(counts, rates))
    assert any(binom.sf(buffer - 1, n + 1, q) > 1e-6 for n, q in zip(counts, rates))
    np.testing.assert_allclose(privacy.overflow_probability(counts, rates, buffer), binom.sf(buffer, counts + 1, rates))
    assert buffer < privacy.poisson_buffer_size(16, 1e-6)
    assert client_poisson_buffer_size([5, 3], 16) == 6  # rate 1: every example (and the neighbour's extra one)
    with pytest.raises(ValueError, match="num_examples"):
        client_poisson_buffer_size([0, 4], 16)
