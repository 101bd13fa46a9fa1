"""Server optimisers against NumPy implementations of Reddi et al. 2021, Algorithm 2 (FedAvgM,
FedAdam, FedYogi written from the paper's formulas in float64, not from optax)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.methods.server_optimizers import init_server_optimizer, make_server_optimizer, server_optimizer_step

SHAPES = {"layer": {"b": (4, 3), "a": (3, 5)}, "scale": (7,)}
ROUND_SCALES = (0.3, 0.3, 0.01, 0.2, 0.001, 0.05, 0.002, 0.1)  # big and small changes: both yogi branches


def random_tree(rng, scale=1.0, dtype=np.float32):
    return jax.tree.map(lambda shape: (scale * rng.standard_normal(shape)).astype(dtype), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def perturbed(params, rng, scale, dtype=np.float32):
    """A round's aggregate: params plus Gaussian noise of std ``scale``, stored in ``dtype``."""
    return jax.tree.map(lambda p, noise: (np.asarray(p, np.float32) + noise).astype(dtype), params,
                        random_tree(rng, scale))


def paper_step(name, x, state, delta, lr, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """One server step on one array in float64, in the paper's notation: delta is the averaged
    client change (after - x); returns (new x, new state); ``state`` None starts the optimiser."""
    if name == "sgd":  # FedAvgM (Hsu et al. 2019): v <- beta v + (x - after); x <- x - lr v
        v = np.zeros_like(x) if state is None else state
        v = momentum * v - delta
        return x - lr * v, v
    m, v = (np.zeros_like(x), np.full_like(x, tau**2)) if state is None else state  # v_{-1} = tau^2
    m = b1 * m + (1 - b1) * delta
    if name == "adam":
        v = b2 * v + (1 - b2) * delta**2
    else:
        v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
    return x + lr * m / (np.sqrt(v) + tau), (m, v)


class PaperRun:
    """The paper's optimiser applied leaf by leaf to a pytree, in float64; a leaf whose ``trained``
    flag is 0 skips the round (params and state unchanged)."""

    def __init__(self, name, params, **options):
        self.name, self.options = name, options
        self.params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
        self.states = jax.tree.map(lambda _: None, params)

    def step(self, after, trained=None):
        trained = jax.tree.map(lambda _: 1.0, self.params) if trained is None else trained

        def leaf(x, state, a, flag):
            return (x, state) if flag == 0 else paper_step(self.name, x, state, np.asarray(a, np.float64) - x,
                                                           **self.options)

        stepped = jax.tree.map(leaf, self.params, self.states, after, trained, is_leaf=lambda v: v is None)
        self.params = jax.tree.map(lambda _, r: r[0], after, stepped)
        self.states = jax.tree.map(lambda _, r: r[1], after, stepped)


def params_shaped(state, params):
    """The subtrees of an optimiser state with the params' structure (momentum, moments)."""

    def like(node):
        return jax.tree.structure(node) == jax.tree.structure(params)

    return [node for node in jax.tree.leaves(state, is_leaf=like) if like(node)]


def jitted_step(tx):
    return jax.jit(functools.partial(server_optimizer_step, tx))


def assert_close(tree, reference, **tolerance):
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, **tolerance)


OPTIMIZERS = [("sgd", {"learning_rate": 0.7, "momentum": 0.9}), ("sgd", {"learning_rate": 1.3, "momentum": 0.0}),
              ("adam", {"learning_rate": 0.05, "b1": 0.8, "b2": 0.95, "eps": 1e-3}),
              ("yogi", {"learning_rate": 0.05, "b1": 0.9, "b2": 0.99, "eps": 1e-2})]


@pytest.mark.parametrize("name,options", OPTIMIZERS, ids=lambda v: v if isinstance(v, str) else None)
def test_matches_the_paper_over_rounds(name, options):
    rng = np.random.default_rng(0)
    tx = make_server_optimizer(name, **options)
    step = jitted_step(tx)
    params = random_tree(rng)
    opt_state = init_server_optimizer(tx, params)
    paper = PaperRun(name, params, **{{"learning_rate": "lr", "eps": "tau"}.get(k, k): v for k, v in options.items()})
    yogi_signs = set()
    for scale in ROUND_SCALES:
        after = perturbed(params, rng, scale)
        if name == "yogi":
            def record_signs(x, state, a):
                v = np.full_like(x, options["eps"] ** 2) if state is None else state[1]
                yogi_signs.update(np.sign(v - (a - x) ** 2).ravel())

            jax.tree.map(record_signs, paper.params, paper.states, after, is_leaf=lambda v: v is None)
        params, opt_state = step(opt_state, params, after)
        paper.step(after)
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
        assert_close(params, paper.params, rtol=1e-5, atol=1e-6)
    if name == "yogi":
        assert {-1.0, 1.0} <= yogi_signs  # v grew on some entries and shrank on others


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sgd_at_lr_one_without_momentum_is_plain_averaging_bit_for_bit(dtype):
    rng = np.random.default_rng(1)
    tx = make_server_optimizer("sgd", learning_rate=1.0, momentum=0.0)
    step = jitted_step(tx)
    params = random_tree(rng, 1e3, dtype)
    opt_state = init_server_optimizer(tx, params)
    assert jax.tree.leaves(opt_state) == []
    naive_is_inexact = False
    for _ in range(5):
        after = random_tree(rng, 1e-3, dtype)
        for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(after)):
            p, a = np.asarray(p, np.float32), np.asarray(a, np.float32)
            naive_is_inexact |= bool(np.any(p - (p - a) != a))
        params, opt_state = step(opt_state, params, after)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(after), strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    assert naive_is_inexact or dtype is jnp.bfloat16  # in float32, before + (-(before - after)) is not `after` here


@pytest.mark.parametrize("name", ["sgd", "adam", "yogi"])
@pytest.mark.parametrize("mask_form", ["scalar", "array"])
def test_untrained_factor_stays_bit_identical_and_trained_ones_skip_idle_rounds(name, mask_form):
    """RoLoRA-like alternation: b trains on even rounds, a on odd ones, scale on every round. An
    idle leaf keeps its params and moments bit for bit even though its ``after`` differs, and a
    leaf's trajectory is the paper's optimiser run on its trained rounds only."""
    rng = np.random.default_rng(2)
    options = {"learning_rate": 0.5, "momentum": 0.9} if name == "sgd" else {"learning_rate": 0.05}
    tx = make_server_optimizer(name, **options)
    step = jitted_step(tx)
    params = random_tree(rng)
    opt_state = init_server_optimizer(tx, params)
    paper = PaperRun(name, params, lr=options["learning_rate"])
    for round_index in range(6):
        idle, busy = ("a", "b") if round_index % 2 == 0 else ("b", "a")
        flags = {"layer": {idle: 0.0, busy: 1.0}, "scale": 1.0}
        trained = flags if mask_form == "scalar" else jax.tree.map(lambda f, p: np.full(p.shape, f, np.float32),
                                                                   flags, params)
        after = perturbed(params, rng, 0.1)
        old_params, old_state = params, opt_state
        params, opt_state = step(opt_state, params, after, trained)
        paper.step(after, flags)
        np.testing.assert_array_equal(params["layer"][idle], old_params["layer"][idle])
        moments, old_moments = params_shaped(opt_state, params), params_shaped(old_state, params)
        assert len(moments) == (1 if name == "sgd" else 2)
        for new, old in zip(moments, old_moments):
            np.testing.assert_array_equal(new["layer"][idle], old["layer"][idle])
            assert not np.array_equal(new["layer"][busy], old["layer"][busy])
        assert_close(params, paper.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam", "yogi"])
def test_bf16_params_stay_bf16_with_float32_state(name):
    rng = np.random.default_rng(3)
    tx = make_server_optimizer(name, learning_rate=0.1)
    step = jitted_step(tx)
    params = random_tree(rng, dtype=jnp.bfloat16)
    opt_state = init_server_optimizer(tx, params)
    paper = PaperRun(name, params, lr=0.1)
    for _ in range(5):
        after = perturbed(params, rng, 0.1, jnp.bfloat16)
        params, opt_state = step(opt_state, params, after)
        paper.step(after)
        paper.params = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16), np.float64), paper.params)
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in jax.tree.leaves(opt_state)} == {jnp.dtype(jnp.float32)}
        assert_close(params, paper.params, rtol=2**-7, atol=1e-6)  # within a bf16 rounding


def state_signature(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.9), ("yogi", 0.9)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_state_survives_a_checkpoint_round_trip(name, momentum, dtype):
    """The state is a pytree of float32 arrays whose structure, shapes and dtypes do not change
    across rounds; its leaves saved as NumPy arrays and unflattened into a fresh init's structure
    continue the run bit for bit."""
    rng = np.random.default_rng(4)
    tx = make_server_optimizer(name, learning_rate=0.2, momentum=momentum)
    step = jitted_step(tx)
    params = random_tree(rng, dtype=dtype)
    opt_state = init_server_optimizer(tx, params)
    at_init = state_signature(opt_state)
    for _ in range(2):
        params, opt_state = step(opt_state, params, perturbed(params, rng, 0.1, dtype))
        assert state_signature(opt_state) == at_init
        assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(opt_state))
    saved = [np.asarray(x) for x in jax.tree.leaves(opt_state)]
    restored = jax.tree.unflatten(jax.tree.structure(init_server_optimizer(tx, params)), saved)
    after = perturbed(params, rng, 0.1, dtype)
    continued = step(opt_state, params, after)
    resumed = step(restored, params, after)
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(continued), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("options,message", [
    ({"name": "x"}, "federation.server_optimizer.name must be sgd, adam or yogi, got 'x'"),
    ({"name": "Adam"}, "federation.server_optimizer.name must be sgd, adam or yogi, got 'Adam'"),
    ({"learning_rate": 0.0}, "federation.server_optimizer.learning_rate must be a positive number, got 0.0"),
    ({"learning_rate": float("nan")}, "federation.server_optimizer.learning_rate must be a positive number, got nan"),
    ({"learning_rate": "1"}, "federation.server_optimizer.learning_rate must be a positive number, got '1'"),
    ({"learning_rate": True}, "federation.server_optimizer.learning_rate must be a positive number, got True"),
    ({"momentum": 1.0}, "federation.server_optimizer.momentum must be a number in [0, 1), got 1.0"),
    ({"momentum": -0.1}, "federation.server_optimizer.momentum must be a number in [0, 1), got -0.1"),
    ({"name": "adam", "b1": 1.0}, "federation.server_optimizer.b1 must be a number in [0, 1), got 1.0"),
    ({"name": "yogi", "b2": 1.5}, "federation.server_optimizer.b2 must be a number in [0, 1), got 1.5"),
    ({"name": "yogi", "eps": 0.0}, "federation.server_optimizer.eps must be a positive number, got 0.0"),
    ({"name": "sgd", "eps": float("inf")}, "federation.server_optimizer.eps must be a positive number, got inf"),
])
def test_bad_options_raise_one_line(options, message):
    options = {"name": "sgd", "learning_rate": 1.0, **options}
    with pytest.raises(ValueError) as error:
        make_server_optimizer(**options)
    assert str(error.value) == message
