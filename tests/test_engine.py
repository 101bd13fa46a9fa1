"""The federated engine: vmapped == sequential clients, chunking, frozen base, compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.client import train_clients
from fedlora_jax.params import factor_mask, leaf_names
from fedlora_jax.server import device_shards, init_server_state
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
    batched, stats = jax.jit(fed.run_clients)(exp.frozen, start, rows, offsets, counts, keys, round_index, mask)
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
    from fedlora_jax.simulate import CPU_CHUNK_TOKENS

    assert jax.default_backend() == "cpu"
    # padded rows: 16 rows x 32 tokens = 512 tokens per client step -> groups of at most 4; the
    # cohort of 5 then takes 2 chunks, sized evenly (3 + 2)
    padded = tiny_experiment(**{"data.seq_len": 32, "federation.batch_size": 16})
    assert CPU_CHUNK_TOKENS // (16 * 32) == 4 and padded.federation.clients_per_chunk == 3
    # packed: the rows' mean real length counts (16 to 32 tokens here), so all 5 fit one group
    packed = tiny_experiment(**{"data.seq_len": 32, "federation.batch_size": 16, "data.packing": "auto"})
    lengths = np.asarray(packed.data.train["attention_mask"]).sum(1)
    assert CPU_CHUNK_TOKENS // (16 * lengths.mean()) >= 5 and packed.federation.clients_per_chunk is None
    # a step as large as the cohort's: all at once; explicit values stay
    assert tiny_experiment().federation.clients_per_chunk is None  # 8 x 12 tokens
    assert tiny_experiment(**{"federation.clients_per_chunk": 3}).federation.clients_per_chunk == 3
    # on 2 devices each vmaps its share of the cohort (3 of 5 clients): groups of 4 hold it whole
    from fedlora_jax.simulate import clients_per_chunk

    assert clients_per_chunk(padded.config, padded.data, False, None, share=3) is None
    assert clients_per_chunk(padded.config, padded.data, False, None, share=5) == 3


@pytest.mark.parametrize("chunk", [1, 2, 3])  # cohort 5: five chunks of 1; 2 + 2 + 1; 3 + 2
def test_chunked_equals_unchunked(chunk, unchunked_round):
    state, shards, (s1, out1) = unchunked_round
    chunked = tiny_experiment(**{"federation.clients_per_chunk": chunk})
    s2, out2 = jax.jit(chunked.federation.round)(state, shards)
    assert_trees_close(out1.client_params, out2.client_params, atol=1e-6)
    assert_trees_close(s1.params, s2.params, atol=1e-6)
    np.testing.assert_allclose(out1.train_loss, out2.train_loss, atol=1e-6)


def test_frozen_base_unchanged_and_only_lora_and_head_trained():
    exp = tiny_experiment()
    frozen_before = jax.tree.map(np.array, exp.frozen)
    params_before = jax.tree.map(np.array, exp.params)
    round_fn = exp.federation.compile_round()
    state = init_server_state(exp.params, exp.frozen, seed=0)
    for _ in range(2):
        state, _ = round_fn(state, device_shards(exp.data))
    assert_trees_close(state.frozen, frozen_before, atol=0)
    names = leaf_names(state.params)
    assert all(n.endswith(("lora_a", "lora_b")) or n.startswith("head.") for n in names)
    changed = [n for n, a, b in zip(names, jax.tree.leaves(state.params), jax.tree.leaves(params_before))
               if not np.array_equal(a, b)]
    assert {n.rsplit(".", 1)[-1] for n in changed} >= {"lora_a", "lora_b", "kernel"}
    # the optimiser state holds moments for exactly the trainable leaves (Adam: mu and nu), nothing frozen
    opt_state = exp.federation.trainer.optimizer.init(exp.params)
    trainable_size = sum(x.size for x in jax.tree.leaves(exp.params))
    moment_sizes = [x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sum(moment_sizes) == 2 * trainable_size
    frozen_size = sum(x.size for x in jax.tree.leaves(exp.frozen))
    assert frozen_size > 10 * trainable_size


def test_round_compiles_once_across_rounds():
    exp = tiny_experiment(**{"data.examples_per_client": "[3, 60]"})
    round_fn = exp.federation.compile_round()
    state = init_server_state(exp.params, exp.frozen, seed=0)
    shards = device_shards(exp.data)
    cohorts = []
    for _ in range(4):
        state, out = round_fn(state, shards)
        cohorts.append(tuple(np.asarray(out.cohort)))
    assert round_fn._cache_size() == 1
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
    p1, _ = run(exp.frozen, start, rows, offsets, counts, keys, jnp.int32(0), mask)
    p2, _ = run(exp.frozen, start, garbage, offsets, counts, keys, jnp.int32(0), mask)
    assert_trees_close(p1, p2, atol=0)


def test_fedit_aggregate_is_example_weighted_mean():
    exp = tiny_experiment()
    fed = exp.federation
    start, rows, offsets, counts, keys, mask = cohort_inputs(exp, 3)
    client_params, _ = fed.run_clients(exp.frozen, start, rows, offsets, counts, keys, jnp.int32(0), mask)
    w = counts / counts.sum()
    new, frozen, divergence = fed.aggregate(client_params, w.astype(jnp.float32), jnp.int32(0), jax.random.key(0), exp.frozen)
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
    from fedlora_jax.simulate import local_subsets

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
