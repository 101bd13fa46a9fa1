"""Compressed uploads: the schemes' statistics and exact bytes, and rounds whose server sees only
what the clients' messages carry."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.aggregation.compression import Compression, random_k, stochastic_quantize, top_k
from fedlora_jax.engine import device_shards, init_server_state
from tiny import tiny_experiment

QUANTIZE8 = "{kind: quantize, bits: 8}"


def test_stochastic_quantization_is_unbiased_and_on_its_grid():
    """Over 20,000 draws the mean decoded value is within 5 standard errors of x (the rounding's
    variance is at most step^2 / 4), and every draw lies on its block's 2^b levels."""
    x = jax.random.normal(jax.random.key(0), (6, 10)) * jnp.arange(1, 11)  # blocks of 8 straddle rows
    bits, block, draws = 2, 8, 20_000
    decoded = jax.vmap(lambda k: stochastic_quantize(x, bits, block, k))(jax.random.split(jax.random.key(1), draws))
    flat = np.asarray(x).reshape(-1)
    scale = np.repeat(np.abs(np.pad(flat, (0, -flat.size % block))).reshape(-1, block).max(axis=1), block)[:flat.size]
    step = 2 * scale / (2 ** bits - 1)
    np.testing.assert_array_less(np.abs(np.asarray(decoded.mean(axis=0)).reshape(-1) - flat),
                                 5 * step / 2 / math.sqrt(draws) + 1e-6)
    levels = (np.asarray(decoded).reshape(draws, -1) + scale) / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.asarray(decoded).std(axis=0).max() > 0  # the rounding is random


def test_random_k_is_unbiased_and_top_k_keeps_the_largest():
    x = jax.random.normal(jax.random.key(2), (8, 12))
    draws, k = 20_000, 10
    decoded = jax.vmap(lambda key: random_k(x, k, key))(jax.random.split(jax.random.key(3), draws))
    assert int(jnp.max(jnp.sum(decoded != 0, axis=(1, 2)))) == k
    # each entry is kept with probability k / n and then scaled by n / k: variance x^2 (n / k - 1)
    n = x.size
    bound = 5 * np.abs(np.asarray(x)) * math.sqrt(n / k - 1) / math.sqrt(draws) + 1e-6
    np.testing.assert_array_less(np.abs(np.asarray(decoded.mean(axis=0)) - np.asarray(x)), bound)
    kept = np.asarray(top_k(x, k))
    largest = np.sort(np.abs(np.asarray(x)).reshape(-1))[-k:]
    np.testing.assert_array_equal(np.sort(np.abs(kept[kept != 0])), largest)
    np.testing.assert_array_equal(kept[kept != 0], np.asarray(x)[kept != 0])


@pytest.mark.parametrize("scheme, want", [
    (Compression("quantize", bits=8, block=64), 128 + 4 * 2),  # 128 values of 1 byte, 2 scales
    (Compression("quantize", bits=4, block=64), 64 + 4 * 2),
    (Compression("quantize", bits=3, block=100), 48 + 4 * 2),  # ceil(128 * 3 / 8) = 48 bytes
    (Compression("topk", fraction=0.1), 8 * 13),  # ceil(12.8) values and int32 indices
    (Compression("randk", fraction=0.1), 4 * 13),  # values only: the server draws the same indices
])
def test_message_bytes_by_hand(scheme, want):
    assert scheme.message_bytes((16, 8)) == want


def test_a_quantized_run_sends_the_hand_counted_bytes():
    """bytes_up of an 8-bit run: per client and uploaded leaf (FedIT: every A, B and the head),
    one byte per value plus a float32 scale per 64 values: about a quarter of float32."""
    exp = tiny_experiment(**{"federation.compression": QUANTIZE8})
    plain = tiny_experiment()
    k = exp.federation.cohort_size
    sizes = [x.size for x in jax.tree.leaves(exp.params)]
    want = k * sum(n + 4 * math.ceil(n / 64) for n in sizes)
    up, down = exp.federation.communication_bytes(exp.params, exp.frozen, 0)
    assert up == want
    plain_up, plain_down = plain.federation.communication_bytes(plain.params, plain.frozen, 0)
    assert plain_up == k * 4 * sum(sizes) and down == plain_down  # downloads stay float32
    assert 0.25 < up / plain_up < 0.3


def _one_round(exp, federation=None):
    fed = federation or exp.federation
    state = init_server_state(exp.params, exp.frozen, 0, fed)
    return state, jax.jit(fed.round)(state, device_shards(exp.data))


def test_lossless_schemes_give_the_uncompressed_round():
    """Top-k of every value is the update itself and 16-bit quantization nearly so: the round's
    new state equals the uncompressed round's."""
    _, (plain, _) = _one_round(tiny_experiment())
    for scheme, atol in [("{kind: topk, fraction: 1.0}", 1e-6), ("{kind: quantize, bits: 16, block: 4}", 1e-4)]:
        _, (state, _) = _one_round(tiny_experiment(**{"federation.compression": scheme}))
        for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)):
            np.testing.assert_allclose(got, want, atol=atol)


@pytest.mark.parametrize("method", [
    "fedit", "ffa", "fedsa",
    pytest.param("flora_na", marks=pytest.mark.slow), pytest.param("fra", marks=pytest.mark.slow),
    pytest.param("flora", marks=pytest.mark.slow), pytest.param("fedex", marks=pytest.mark.slow),
    pytest.param("rolora", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("scheme", [QUANTIZE8, "{kind: topk, fraction: 0.25}", "{kind: randk, fraction: 0.25}"])
def test_every_method_runs_with_each_scheme(method, scheme):
    """The round changes what the method aggregates (not the clients' own models), and what a
    client keeps never travels: FFA's frozen A stays bit-identical, FedSA's bank holds the exact
    trained B."""
    exp = tiny_experiment(**{"federation.method": method, "federation.compression": scheme})
    start, (state, out) = _one_round(exp)
    plain = dataclasses.replace(exp.federation, compression=None)
    _, (plain_state, plain_out) = _one_round(exp, plain)
    assert all(bool(f) for f in np.asarray(out.finite))
    for got, want in zip(jax.tree.leaves(out.client_params), jax.tree.leaves(plain_out.client_params)):
        np.testing.assert_array_equal(got, want)  # the clients trained the same
    moved = [not np.allclose(a, b, atol=1e-7) for a, b in zip(jax.tree.leaves(state.params),
                                                               jax.tree.leaves(plain_state.params))]
    assert any(moved)
    layout = exp.federation.layout
    leaves = jax.tree.leaves(state.params)
    if method == "ffa":
        for m in layout.modules:
            np.testing.assert_array_equal(leaves[m.a_index], jax.tree.leaves(start.params)[m.a_index])
    if method == "fedsa":
        trained = jax.tree.leaves(out.client_params)
        for m, bank in zip(layout.modules, state.method_state):
            np.testing.assert_array_equal(bank[np.asarray(out.cohort)], trained[m.b_index])


def test_streamed_round_decodes_the_same_messages_as_the_stacked_round():
    """Each client's upload randomness comes from its own key: chunks reduced as they finish see
    the messages the stacked round sees."""
    exp = tiny_experiment(**{"federation.compression": "{kind: randk, fraction: 0.3}", "federation.method": "fedex",
                             "federation.clients_per_chunk": 2, "eval.local": False})
    fed = exp.federation
    assert fed.streams
    _, (streamed, _) = _one_round(exp)
    _, (stacked, _) = _one_round(exp, dataclasses.replace(fed, keep_client_params=True))
    for got, want in zip(jax.tree.leaves((streamed.params, streamed.frozen)),
                         jax.tree.leaves((stacked.params, stacked.frozen))):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_user_level_dp_clips_the_decoded_uploads():
    """Under user-level DP the server clips what it decodes (compression sits before clipping and
    noise): with no noise, the mean update stays within the clip norm though 2-bit messages are
    far from the trained states."""
    clip = 1e-3
    exp = tiny_experiment(**{"federation.compression": "{kind: quantize, bits: 2}", "privacy.user_level": "true",
                             "privacy.user_noise_multiplier": 0.0, "privacy.user_clip_norm": clip})
    start, (state, out) = _one_round(exp)
    assert all(bool(f) for f in np.asarray(out.finite))
    pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(start.params))
    norm = math.sqrt(sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2)) for a, b in pairs))
    assert 0 < norm <= clip * (1 + 1e-5)


def test_error_feedback_sends_what_earlier_messages_left_out():
    """Per client and uploaded leaf: decoded + new residual = update + old residual; a leaf the
    client keeps (FFA's A) passes through with its residual untouched."""
    from fedlora_jax.engine import uploads

    exp = tiny_experiment(**{"federation.method": "ffa"})
    fed, k = exp.federation, 3
    rng = np.random.default_rng(0)
    start = jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), exp.params)
    trained = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), start)
    owed = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), start)
    keys = jax.random.split(jax.random.key(0), k)
    got, left = uploads.received(Compression("topk", fraction=0.2), fed.method, fed.layout, start, trained, 0,
                                 keys, owed)
    a_leaves = {m.a_index for m in fed.layout.modules}
    for i, (s, t, g, o, n) in enumerate(zip(*(jax.tree.leaves(x) for x in (start, trained, got, owed, left)))):
        if i in a_leaves:
            np.testing.assert_array_equal(g, t)
            np.testing.assert_array_equal(n, o)
        else:
            np.testing.assert_allclose(np.asarray(g - s) + np.asarray(n), np.asarray(t - s) + np.asarray(o), atol=1e-5)
            assert float(jnp.max(jnp.abs(n))) > 0


def test_error_feedback_banks_follow_the_cohort_and_survive_a_resume(tmp_path, monkeypatch, capsys):
    """The residual banks change only for clients that took part, and a run stopped after round 2
    and resumed ends as the uninterrupted run (the banks are in the checkpoint)."""
    from pathlib import Path

    from fedlora_jax.cli import main
    from processes import press_ctrl_c_in_round
    from rundirs import assert_same_run, final_state

    exp = tiny_experiment(**{"federation.compression": "{kind: topk, fraction: 0.2, error_feedback: true}"})
    fed = exp.federation
    assert not fed.streams
    _, (state, out) = _one_round(exp)
    took = np.zeros(fed.cohort.num_clients, bool)
    took[np.asarray(out.cohort)[np.asarray(out.cohort_mask)]] = True
    for bank in jax.tree.leaves(state.residuals):
        touched = np.any(np.asarray(bank).reshape(bank.shape[0], -1) != 0, axis=1)
        np.testing.assert_array_equal(touched, took)

    config = str(Path(__file__).resolve().parents[1] / "configs/quickstart.yaml")
    args = ["--quiet", "--set", "federation.compression={kind: topk, fraction: 0.2, error_feedback: true}",
            "--set", "federation.rounds=4", "--set", "checkpoint.every=2", "--set", "eval.every=2",
            "--set", "federation.devices=1", "--set", "data.packing=null", "--set", "eval.local=false"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert main(["run", config, "--out", str(reference), *args]) == 0
    assert any(name.startswith("residual/") for name in final_state(reference))
    press_ctrl_c_in_round(monkeypatch, 2)
    assert main(["run", config, "--out", str(stopped), *args]) == 130
    monkeypatch.undo()
    assert main(["resume", str(stopped), "--quiet"]) == 0
    assert_same_run(stopped, reference)


def test_error_feedback_that_cannot_fit_is_refused_in_one_line(monkeypatch):
    from fedlora_jax.config import ConfigError
    from fedlora_jax.run import build as build_module

    monkeypatch.setattr(build_module, "memory_available", lambda: 1024)
    with pytest.raises(ConfigError, match="federation.compression.error_feedback': the residuals of 6 clients"):
        tiny_experiment(**{"federation.compression": "{kind: topk, error_feedback: true}"})
