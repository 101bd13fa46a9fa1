"""The federated engine: vmapped == sequential clients, chunking, frozen base, compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.engine import train_clients
from fedlora_jax.params import factor_mask, leaf_names
from fedlora_jax.engine import device_shards, init_server_state
from tiny import tiny_experiment


def cohort_inputs(exp, k):
    fed = exp.federation
    shards = device_shards(exp.data)
    cohort = jnp.arange(k)
    start = jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), exp.params)
    keys = jax.random.split(jax.random.key(7), k)
    mask = factor_mask(fed.layout, exp.params, 1.0, 1.0)
    return start, shards.arrays, shards.offsets[cohort], shards.num_examples[cohort], keys, mask


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_vmapped_clients_equal_one_at_a_time():
    exp = tiny_experiment()
    fed = exp.federation
    start, rows, offsets, counts, keys, mask = cohort_inputs(exp, fed.cohort_size)
    round_index = jnp.int32(0)
    batched, stats = jax.jit(fed.run_clients)(exp.frozen, start, rows, offsets, counts, keys, None, round_index, mask)
    def one_client(params, offset, n, key):  # a group of one client
        params, offset, n, key = jax.tree.map(lambda x: x[None], (params, offset, n, key))
        return jax.tree.map(lambda x: x[0], train_clients(fed.trainer, exp.frozen, params, rows, offset, n, key,
                                                          round_index, mask))

    single = jax.jit(one_client)
    for u in range(fed.cohort_size):
        pick = lambda t: jax.tree.map(lambda x: x[u], t)
        params_u, stats_u = single(pick(start), offsets[u], counts[u], keys[u])
        assert_trees_close(pick(batched), params_u, atol=1e-5)
        np.testing.assert_allclose(stats.loss[u], stats_u.loss, atol=1e-5)
    # training moved the adapters: B left zero and differs between clients
    b = [x for n, x in zip(leaf_names(batched), jax.tree.leaves(batched)) if n.endswith("lora_b")][0]
    assert float(jnp.abs(b).max()) > 0 and float(jnp.abs(b[0] - b[1]).max()) > 0


@pytest.fixture(scope="module")
def unchunked_round():
    exp = tiny_experiment(**{"federation.clients_per_chunk": "null"})
    state = init_server_state(exp.params, exp.frozen, seed=0)
    return state, device_shards(exp.data), jax.jit(exp.federation.round)(state, device_shards(exp.data))


def test_auto_chunks_vmap_about_2048_tokens_per_step_on_a_cpu():
    from fedlora_jax.run.plan import CPU_CHUNK_TOKENS

    assert jax.default_backend() == "cpu"
    # padded rows: 16 rows x 32 tokens = 512 tokens per client step -> groups of at most 4; the
    # cohort of 5 then takes 2 chunks, sized evenly (3 + 2)
    one_device = {"data.seq_len": 32, "federation.batch_size": 16, "federation.devices": 1}
    padded = tiny_experiment(**one_device)
    assert CPU_CHUNK_TOKENS // (16 * 32) == 4 and padded.federation.clients_per_chunk == 3
    # packed: the rows' mean real length counts (16 to 32 tokens here), so all 5 fit one group
    packed = tiny_experiment(**one_device, **{"data.packing": "auto"})
    lengths = np.asarray(packed.data.train["attention_mask"]).sum(1)
    assert CPU_CHUNK_TOKENS // (16 * lengths.mean()) >= 5 and packed.federation.clients_per_chunk is None
    # a step as large as the cohort's: all at once; explicit values stay
    assert tiny_experiment(**{"federation.devices": 1}).federation.clients_per_chunk is None  # 8 x 12 tokens
    assert tiny_experiment(**{"federation.clients_per_chunk": 3}).federation.clients_per_chunk == 3
    # on 2 devices (a user's default on 2 cores) each vmaps its share of the cohort (3 of 5
    # clients): groups of 4 hold it whole
    two_devices = tiny_experiment(**{"data.seq_len": 32, "federation.batch_size": 16})
    assert two_devices.federation.devices == 2 and two_devices.federation.clients_per_chunk is None


# cohort 5: five chunks of 1; 2 + 2 + 1; 3 + 2 (quick: 2)
@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_chunked_equals_unchunked(chunk, unchunked_round):
    state, shards, (s1, out1) = unchunked_round
    chunked = tiny_experiment(**{"federation.clients_per_chunk": chunk})
    s2, out2 = jax.jit(chunked.federation.round)(state, shards)
    assert_trees_close(out1.client_params, out2.client_params, atol=1e-6)
    assert_trees_close(s1.params, s2.params, atol=1e-6)
    np.testing.assert_allclose(out1.train_loss, out2.train_loss, atol=1e-6)


def test_frozen_base_unchanged_and_only_lora_and_head_trained():
    import dataclasses

    import optax

    exp = tiny_experiment()
    trainable_names, frozen_names = leaf_names(exp.params), leaf_names(exp.frozen)
    assert all(n.endswith(("lora_a", "lora_b")) or n.startswith("head.") for n in trainable_names)
    assert not set(trainable_names) & set(frozen_names)
    # the clients' optimiser, recording (at trace time, per client) the trees it is given
    seen = {}
    inner = exp.federation.trainer.optimizer

    def init(params):
        state = inner.init(params)
        seen["params"] = leaf_names(params)
        seen["state"] = [(n, x.shape) for n, x in zip(leaf_names(state), jax.tree.leaves(state))]
        return state

    def update(grads, state, params=None):
        seen["grads"] = [(n, g.shape) for n, g in zip(leaf_names(grads), jax.tree.leaves(grads))]
        return inner.update(grads, state, params)

    trainer = dataclasses.replace(exp.federation.trainer, optimizer=optax.GradientTransformation(init, update))
    federation = dataclasses.replace(exp.federation, trainer=trainer)
    frozen_before = jax.tree.map(np.array, exp.frozen)
    params_before = jax.tree.map(np.array, exp.params)
    round_fn = federation.compile_round()
    state = init_server_state(exp.params, exp.frozen, seed=0)
    rounds = 2
    for _ in range(rounds):
        state, _ = round_fn(state, device_shards(exp.data))

    # every frozen leaf is bit-identical after training
    assert leaf_names(state.frozen) == frozen_names
    for name, after, before in zip(frozen_names, jax.tree.leaves(state.frozen), jax.tree.leaves(frozen_before)):
        after = np.asarray(after)
        assert after.dtype == before.dtype and after.shape == before.shape, name
        assert after.tobytes() == before.tobytes(), f"frozen leaf {name} changed"
    # every trainable leaf moved by more than AdamW's weight decay alone would move it (a leaf with
    # zero gradient decays by (1 - lr * wd) per step: lr * direction, direction = adam + wd * p)
    optim = exp.config.optim
    assert optim.weight_decay > 0 and optim.schedule == "constant"
    decay_only = (1.0 - optim.learning_rate * optim.weight_decay) ** (rounds * exp.config.federation.local_steps)
    assert leaf_names(state.params) == trainable_names
    for name, after, before in zip(trainable_names, jax.tree.leaves(state.params), jax.tree.leaves(params_before)):
        assert np.abs(np.asarray(after) - before * decay_only).max() > 1e-3, f"trainable leaf {name} did not train"
    # gradients and optimiser state exist for exactly the trainable leaves (Adam: mu and nu, plus
    # a scalar step count), one client's shapes, and for no frozen leaf
    shapes = {n: x.shape for n, x in zip(trainable_names, jax.tree.leaves(exp.params))}
    assert seen["params"] == trainable_names
    assert seen["grads"] == list(shapes.items())
    moments = [(n.split(".", 1)[1], shape) for n, shape in seen["state"] if shape != ()]
    assert sorted(moments) == sorted(list(shapes.items()) * 2)
    assert not any(n.endswith(tuple(frozen_names)) for n, _ in seen["state"])


def count_round_traces(monkeypatch) -> list:
    """Patches ``Federation.round`` to record each time jit traces (and so compiles) it."""
    from fedlora_jax.engine import Federation

    traces, traced_round = [], Federation.round

    def counting_round(self, *args):
        traces.append(1)
        return traced_round(self, *args)

    monkeypatch.setattr(Federation, "round", counting_round)
    return traces


def test_round_compiles_once_across_rounds(monkeypatch):
    # traced and compiled once (on several devices jit's dispatch cache may still hold an entry
    # for the first call's freshly placed state beside the one for the round's own outputs)
    traces = count_round_traces(monkeypatch)
    exp = tiny_experiment(**{"data.examples_per_client": "[3, 60]"})
    assert exp.federation.devices == 2
    round_fn = exp.federation.compile_round()
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=exp.federation)  # placed as it returns
    shards = device_shards(exp.data)
    cohorts = []
    for _ in range(4):
        state, out = round_fn(state, shards)
        cohorts.append(tuple(np.asarray(out.cohort)))
    assert len(traces) == 1
    assert len(set(cohorts)) > 1  # different cohorts of unequal sizes, same executable
    assert int(state.round) == 4


def test_other_clients_rows_do_not_affect_training():
    """A client's steps read only its own rows (masked sampling slots included)."""
    exp = tiny_experiment()
    fed = exp.federation
    start, rows, offsets, counts, keys, mask = cohort_inputs(exp, 2)
    own = np.zeros(len(rows["input_ids"]), bool)
    for first, n in zip(np.asarray(offsets), np.asarray(counts)):
        own[first: first + n] = True
    garbage = {}
    for name, x in rows.items():
        fill = (jnp.arange(x.size).reshape(x.shape) % 7 + 1).astype(x.dtype)
        garbage[name] = jnp.where(jnp.asarray(own).reshape((-1,) + (1,) * (x.ndim - 1)), x, fill)
    assert any(not np.array_equal(garbage[k], rows[k]) for k in rows) and not own.all()
    run = jax.jit(fed.run_clients)
    p1, _ = run(exp.frozen, start, rows, offsets, counts, keys, None, jnp.int32(0), mask)
    p2, _ = run(exp.frozen, start, garbage, offsets, counts, keys, None, jnp.int32(0), mask)
    assert_trees_close(p1, p2, atol=0)


def test_fedit_aggregate_is_example_weighted_mean():
    exp = tiny_experiment()
    fed = exp.federation
    start, rows, offsets, counts, keys, mask = cohort_inputs(exp, 3)
    client_params, _ = fed.run_clients(exp.frozen, start, rows, offsets, counts, keys, None, jnp.int32(0), mask)
    w = counts / counts.sum()
    new, frozen, divergence = fed.aggregate(client_params, w.astype(jnp.float32), jnp.int32(0), jax.random.key(0),
                                            exp.frozen)
    assert_trees_close(frozen, exp.frozen, atol=0)
    for x, xs in zip(jax.tree.leaves(new), jax.tree.leaves(client_params)):
        np.testing.assert_allclose(x, np.tensordot(np.asarray(w), np.asarray(xs), axes=1), rtol=1e-5, atol=1e-7)
    assert divergence.shape == (len(fed.layout.modules),) and bool(jnp.all(divergence > 0))


@pytest.mark.parametrize("client_weights", ["examples", "uniform"])
def test_round_weighs_clients_by_examples_or_uniformly(client_weights):
    """A FedIT round's aggregate is the mean of the cohort's trained states weighted by n_u / sum n
    (examples) or by 1 / K (uniform, FLoRA-NA's unweighted ideal): every trainable leaf."""
    exp = tiny_experiment(**{"federation.client_weights": client_weights})
    fed = exp.federation
    state = init_server_state(exp.params, exp.frozen, 0, fed)
    new_state, out = fed.compile_round()(state, device_shards(exp.data))
    counts = np.asarray(exp.data.num_train)[np.asarray(out.cohort)].astype(np.float64)
    assert counts.min() < counts.max()  # the two weightings differ
    w = counts / counts.sum() if client_weights == "examples" else np.full(len(counts), 1 / len(counts))
    assert any(name.endswith(".lora_a") for name in leaf_names(new_state.params))
    for new, trained in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(out.client_params)):
        mean = np.tensordot(w, np.asarray(trained, np.float64), axes=1)
        np.testing.assert_allclose(np.asarray(new), mean, rtol=1e-5, atol=1e-7)


def test_local_evaluation_subsets_are_drawn_from_each_clients_own_rows():
    from fedlora_jax.data.synthetic import make_synthetic
    from fedlora_jax.eval.evaluation import local_subsets

    data = make_synthetic(5, (10, 80), seed=1)
    arrays, kept = local_subsets(data, limit=6, seed=0)
    assert kept.tolist() == np.minimum(data.num_local_test, 6).tolist()
    starts = np.concatenate([[0], np.cumsum(kept)[:-1]])
    for u in range(5):
        rows = data.client_local_test(u)
        own = {tuple(row) + (label,) for row, label in zip(rows["input_ids"], rows["labels"])}
        span = slice(starts[u], starts[u] + kept[u])
        picked = [tuple(row) + (label,) for row, label in zip(arrays["input_ids"][span], arrays["labels"][span])]
        assert len(set(picked)) == kept[u] and set(picked) <= own
    full, all_kept = local_subsets(data, limit=None, seed=0)
    assert all_kept.tolist() == data.num_local_test.tolist()
