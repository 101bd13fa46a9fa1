"""Packed streams compute what padded rows compute: losses, gradients, DP-SGD, whole rounds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax.data.packing import pack, token_buckets
from fedlora_jax.models import create_model
from fedlora_jax.models.lora import LoRAConfig, LoRALinear, inject_lora, split_model
from fedlora_jax.tasks import forward, per_example_loss

BERT = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 40}
LLAMA = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}


def _rows(task: str, b: int = 6, length: int = 12, seed: int = 0, lengths=None) -> dict:
    """A right-padded batch with random lengths (one row of full length)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, length + 1, size=b) if lengths is None else np.asarray(lengths)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    rows = {"input_ids": (rng.integers(3, 50, size=(b, length)) * mask).astype(np.int32), "attention_mask": mask}
    if task == "causal_lm":
        rows["loss_mask"] = (mask * (np.arange(length)[None, :] >= 2)).astype(np.int32)
    else:
        rows["token_type_ids"] = np.zeros((b, length), np.int32)
        rows["labels"] = rng.integers(0, 3, size=b).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in rows.items()}


def _model(arch: str, task: str, pooling: str = "cls", rank: int = 4, seed: int = 0):
    config = LLAMA if arch == "llama" else BERT
    kwargs = {} if task == "causal_lm" else {"pooling": pooling}
    model = create_model(arch, config, task=task, num_labels=3, seed=seed, **kwargs)
    inject_lora(model, LoRAConfig(rank=rank, alpha=8, targets=("all-linear",)), jax.random.key(seed + 1))
    graphdef, params, frozen = split_model(model)
    # non-zero B so the LoRA path matters
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape, x.dtype), params)
    return graphdef, params, frozen


def _loss_fn(graphdef, frozen, task):
    def loss(params, batch, mask):
        losses = per_example_loss(forward(nnx.merge(graphdef, params, frozen), batch), batch, task)
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0), losses
    return loss


def test_pack_lays_real_tokens_end_to_end_and_unpacks_back():
    rows = _rows("classification", b=5, length=8, lengths=[8, 3, 5, 2, 6])
    mask = jnp.array([1, 1, 0, 1, 1])
    packed, fits = pack(rows, mask, num_tokens=24)
    assert bool(fits)
    p = packed["packing"]
    np.testing.assert_array_equal(p.lengths, [8, 3, 0, 2, 6])
    np.testing.assert_array_equal(p.starts, [0, 8, 11, 11, 13])
    np.testing.assert_array_equal(p.segment_ids[0], [1] * 8 + [2] * 3 + [4] * 2 + [5] * 6 + [0] * 5)
    np.testing.assert_array_equal(p.positions[0, :13], list(range(8)) + [0, 1, 2, 0, 1])
    index, real = p.example_tokens()
    unpacked = np.where(real, np.asarray(packed["input_ids"][0])[np.asarray(index)], 0)
    expected = np.asarray(rows["input_ids"]) * np.asarray(mask)[:, None]
    np.testing.assert_array_equal(unpacked, expected)
    np.testing.assert_array_equal(packed["labels"], rows["labels"])
    _, fits = pack(rows, mask, num_tokens=18)
    assert not bool(fits)


@pytest.mark.parametrize("arch,task,pooling", [  # quick tier: llama (encoders: test_packed_round_equals_padded_round)
    pytest.param("bert", "classification", "cls", marks=pytest.mark.slow),
    pytest.param("bert", "classification", "mean", marks=pytest.mark.slow),
    pytest.param("roberta", "classification", "cls", marks=pytest.mark.slow), ("llama", "causal_lm", "cls"),
])
def test_packed_loss_and_gradient_equal_padded(arch, task, pooling):
    graphdef, params, frozen = _model(arch, task, pooling)
    rows = _rows(task, b=6, length=12)
    mask = jnp.array([1, 1, 1, 0, 1, 1], jnp.float32)
    loss = _loss_fn(graphdef, frozen, task)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (padded_loss, padded_losses), padded_grad = grad(params, rows, mask)
    packed, fits = pack(rows, mask, num_tokens=80, aligned=arch != "llama")  # encoders: attention by blocks
    assert bool(fits)
    (packed_loss, packed_losses), packed_grad = grad(params, packed, mask)
    np.testing.assert_allclose(packed_losses * mask, padded_losses * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(packed_grad), jax.tree.leaves(padded_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(padded_grad)) > 1e-3


@pytest.mark.parametrize("shared", [False, True])
def test_token_buckets_cover_the_step_need(shared):
    rng = np.random.default_rng(0)
    lengths = [rng.integers(2, 40, size=n) for n in rng.integers(50, 200, size=10)]
    buckets, _ = token_buckets(lengths, rows_per_step=16, clients_per_step=4, max_length=64, multiple=32,
                               shared=shared)
    padded = 16 * 64 * (4 if shared else 1)
    assert buckets == tuple(sorted(set(buckets))) and all(b % 32 == 0 and b < padded for b in buckets)
    # the largest bucket holds at least 99.9% of simulated steps: the largest client, or the clients' sum when shared
    combine = sum if shared else max
    need = [combine(int(rng.choice(lengths[u], 16, replace=False).sum()) for u in rng.choice(10, 4, replace=False))
            for _ in range(3000)]
    assert np.mean(np.array(need) <= buckets[-1]) > 0.999


# quick tier: llama (the DP rounds of test_privacy_engine.py book-keep too)
@pytest.mark.parametrize("arch,task,pooling", [
    pytest.param("bert", "classification", "cls", marks=pytest.mark.slow),
    pytest.param("bert", "classification", "mean", marks=pytest.mark.slow),
    pytest.param("roberta", "classification", "cls", marks=pytest.mark.slow), ("llama", "causal_lm", "cls"),
])
def test_bookkeeping_per_example_gradients_equal_vmap(arch, task, pooling):
    from fedlora_jax.privacy.bookkeeping import per_example_gradients, unsupported_leaves

    graphdef, params, frozen = _model(arch, task, pooling)
    assert unsupported_leaves(graphdef, params, frozen) == []
    rows = _rows(task, b=5, length=10, seed=1)
    mask = jnp.array([1, 0, 1, 1, 1], jnp.float32)

    def one_loss(p, example):
        example = jax.tree.map(lambda x: x[None], example)
        return per_example_loss(forward(nnx.merge(graphdef, p, frozen), example), example, task)[0]

    reference_losses, reference = jax.vmap(jax.value_and_grad(one_loss), in_axes=(None, 0))(params, rows)
    for batch in (rows, pack(rows, mask, num_tokens=64, aligned=arch != "llama")[0]):
        losses, grads = jax.jit(per_example_gradients, static_argnums=(0, 5))(
            graphdef, params, frozen, batch, mask, task)
        np.testing.assert_allclose(losses * mask, reference_losses * mask, rtol=1e-5, atol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
            np.testing.assert_allclose(g * mask.reshape((-1,) + (1,) * (g.ndim - 1)),
                                       r * mask.reshape((-1,) + (1,) * (r.ndim - 1)), rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(g[1], 0.0)  # a masked row gets no gradient


@pytest.mark.parametrize("arch,pooling", [  # quick: bert cls
    ("bert", "cls"), pytest.param("bert", "mean", marks=pytest.mark.slow),
    pytest.param("roberta", "cls", marks=pytest.mark.slow)])
def test_shared_stream_gives_each_client_its_own_model(arch, pooling):
    """C clients with different trainable leaves in one stream: each example's logits, loss and
    gradient are those of its own client's model on its own rows (LoRA on every linear layer,
    the pooler's included, and the head)."""
    graphdef, params, frozen = _model(arch, "classification", pooling)
    clients, b = 3, 4
    stacked = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(11), (clients,) + x.shape, x.dtype), params)
    rows = _rows("classification", b=clients * b, length=10, seed=2)
    mask = jnp.ones(clients * b).at[5].set(0.0)
    batch, fits = pack(rows, mask, num_tokens=128, clients=clients, aligned=True)
    assert bool(fits) and batch["packing"].clients == clients
    loss = _loss_fn(graphdef, frozen, "classification")

    def total(stacked):
        losses = loss(stacked, batch, mask)[1].reshape(clients, b)
        client_mask = mask.reshape(clients, b)
        return jnp.sum(jnp.sum(losses * client_mask, 1) / jnp.sum(client_mask, 1)), losses

    (_, shared_losses), shared_grads = jax.jit(jax.value_and_grad(total, has_aux=True))(stacked)
    own_rows = jax.tree.map(lambda x: x.reshape((clients, b) + x.shape[1:]), rows)
    (_, own_losses), own_grads = jax.jit(jax.vmap(jax.value_and_grad(loss, has_aux=True)))(
        stacked, own_rows, mask.reshape(clients, b))
    client_mask = mask.reshape(clients, b)  # a masked example has no tokens in the stream
    np.testing.assert_allclose(shared_losses * client_mask, own_losses * client_mask, rtol=1e-5, atol=1e-6)
    for a, r in zip(jax.tree.leaves(shared_grads), jax.tree.leaves(own_grads)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
    assert not np.allclose(own_losses[0], own_losses[1])  # the clients' models differ


# quick twins: test_shared_stream_gives_each_client_its_own_model, test_bookkeeping_per_example_gradients_equal_vmap
@pytest.mark.slow
def test_shared_stream_bookkeeping_equals_per_client_bookkeeping():
    from fedlora_jax.privacy.bookkeeping import per_example_gradients

    graphdef, params, frozen = _model("bert", "classification", "mean")
    clients, b = 3, 4
    stacked = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), (clients,) + x.shape, x.dtype), params)
    rows = _rows("classification", b=clients * b, length=10, seed=4)
    mask = jnp.ones(clients * b).at[2].set(0.0)
    bookkeeping = jax.jit(per_example_gradients, static_argnums=(0, 5))
    batch, _ = pack(rows, mask, num_tokens=128, clients=clients, aligned=True)
    losses, grads = bookkeeping(graphdef, stacked, frozen, batch, mask, "classification")
    for c in range(clients):
        own = slice(c * b, (c + 1) * b)
        own_batch, _ = pack(jax.tree.map(lambda x: x[own], rows), mask[own], num_tokens=64)
        own_params = jax.tree.map(lambda x: x[c], stacked)
        ref_losses, ref = bookkeeping(graphdef, own_params, frozen, own_batch, mask[own], "classification")
        np.testing.assert_allclose(losses[own], ref_losses, rtol=1e-5, atol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
            np.testing.assert_allclose(g[own], r, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # quick twin: test_shared_stream_gives_each_client_its_own_model
def test_shared_stream_round_equals_per_client_streams():
    import dataclasses

    from tiny import tiny_experiment

    for overrides in ({"data.packing": "auto"},):  # with DP: shared == padded in test_packed_round_equals_padded_round
        exp = tiny_experiment(**overrides)
        fed = exp.federation
        assert fed.trainer.streams.shared
        separate = dataclasses.replace(fed, trainer=dataclasses.replace(fed.trainer, streams=dataclasses.replace(
            fed.trainer.streams, shared=False, token_buckets=(fed.trainer.streams.token_buckets[-1],))))
        (_, o1), (_, o2) = _same_round(exp, fed, separate)
        np.testing.assert_allclose(o1.train_loss, o2.train_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(o1.client_params), jax.tree.leaves(o2.client_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def _same_round(exp, *federations):
    """(state, output) of one round of each federation from the same start."""
    from fedlora_jax.engine import device_shards, init_server_state

    shards = device_shards(exp.data)
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=federations[0])
    return [jax.jit(fed.round)(state, shards) for fed in federations]


def _round_pair(**overrides):
    """(packed, padded) results of the same round of the tiny experiment."""
    import dataclasses

    from fedlora_jax.engine import device_shards, init_server_state
    from tiny import tiny_experiment

    buckets = overrides.pop("buckets", None)
    packed_exp = tiny_experiment(**{**overrides, "data.packing": "auto"})
    padded_exp = tiny_experiment(**{**overrides, "data.packing": "null"})
    assert packed_exp.plan.streams.token_buckets and not padded_exp.plan.streams.token_buckets
    fed = packed_exp.federation
    if buckets is not None:
        streams = dataclasses.replace(fed.trainer.streams, token_buckets=buckets)
        fed = dataclasses.replace(fed, trainer=dataclasses.replace(fed.trainer, streams=streams))
    shards = device_shards(packed_exp.data)
    state = init_server_state(packed_exp.params, packed_exp.frozen, seed=0, federation=fed)
    return jax.jit(fed.round)(state, shards), jax.jit(padded_exp.federation.round)(state, shards)


@pytest.mark.parametrize("overrides", [
    {},
    {"buckets": (48,)},  # most steps overflow to the padded branch
    # quick twins of the DP cases: test_bookkeeping_per_example_gradients_equal_vmap, test_devices.py
    pytest.param({"privacy.record_level": "true", "privacy.noise_multiplier": 1.0, "privacy.sampling": "shuffle"},
                 marks=pytest.mark.slow),
    pytest.param({"privacy.record_level": "true", "privacy.noise_multiplier": 1.0, "federation.method": "ffa"},
                 marks=pytest.mark.slow),
], ids=["auto", "overflow", "dp-shuffle", "dp-poisson-ffa"])
def test_packed_round_equals_padded_round(overrides):
    (packed_state, packed_out), (padded_state, padded_out) = _round_pair(**overrides)
    np.testing.assert_allclose(packed_out.train_loss, padded_out.train_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_out.client_params), jax.tree.leaves(padded_out.client_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(packed_state.params), jax.tree.leaves(padded_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.slow  # quick twin: test_bookkeeping_per_example_gradients_equal_vmap
def test_dp_bookkeeping_round_equals_vmap_round():
    import dataclasses

    from tiny import tiny_experiment

    exp = tiny_experiment(**{"privacy.record_level": "true", "privacy.noise_multiplier": 0.5, "data.packing": "null",
                             "privacy.per_layer_clipping": "true"})
    fed = exp.federation
    assert fed.trainer.bookkeeping
    vmapped = dataclasses.replace(fed, trainer=dataclasses.replace(fed.trainer, bookkeeping=False))
    (s1, o1), (s2, o2) = _same_round(exp, fed, vmapped)
    np.testing.assert_allclose(o1.train_loss, o2.train_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.slow  # quick twin: test_engine.py::test_round_compiles_once_across_rounds
def test_round_compiles_once_with_one_packed_shape_per_bucket(monkeypatch):
    import fedlora_jax.engine.client as client
    from test_engine import count_round_traces
    from fedlora_jax.engine import device_shards, init_server_state
    from tiny import tiny_experiment

    traced = []

    def counting_pack(rows, mask, num_tokens, clients=1, aligned=False, score_tokens=0):
        traced.append(num_tokens)
        return pack(rows, mask, num_tokens, clients, aligned, score_tokens)

    monkeypatch.setattr(client, "pack", counting_pack)
    round_traces = count_round_traces(monkeypatch)
    exp = tiny_experiment(**{"privacy.record_level": "true", "privacy.noise_multiplier": 1.0, "data.packing": "auto"})
    fed = exp.federation
    buckets = fed.trainer.streams.token_buckets
    assert len(buckets) >= 2 and fed.trainer.streams.shared
    round_fn = fed.compile_round()
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=fed)
    shards = device_shards(exp.data)
    for _ in range(3):
        state, _ = round_fn(state, shards)
    assert len(round_traces) == 1
    assert sorted(traced) == sorted(buckets)  # each stream length traced (and compiled) once


def test_packed_evaluation_equals_padded_evaluation():
    from fedlora_jax.engine import device_shards, init_server_state
    from tiny import tiny_experiment

    packed = tiny_experiment(**{"eval.batch_size": 16, "data.packing": "auto"})
    padded = tiny_experiment(**{"eval.batch_size": 16, "data.packing": "null"})
    assert packed.evaluator.num_tokens and padded.evaluator.num_tokens is None
    state, out = jax.jit(padded.federation.round)(init_server_state(padded.params, padded.frozen, 0, padded.federation),
                                                  device_shards(padded.data))
    cohort = np.asarray(out.cohort)
    results = []
    for exp in (packed, padded):
        evaluation = exp.evaluation()
        results.append({**evaluation.global_metrics(state),
                        **{f"local_{k}": v
                           for k, v in evaluation.local_metrics(state.frozen, out.client_params, cohort).items()}})
    assert results[0].keys() == results[1].keys() and "local_accuracy" in results[0]
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-5, err_msg=key)


def test_aligned_streams_attend_in_blocks_with_the_same_result():
    from fedlora_jax.models.bert import attention_mask_for, padding_attention, stream_attention

    rows = _rows("classification", b=12, length=8, seed=3)
    mask = jnp.ones(12).at[4].set(0.0)
    packed, fits = pack(rows, mask, num_tokens=100, aligned=True)  # 100 > 8: the model takes blocks
    assert bool(fits)
    p = packed["packing"]
    segments = np.asarray(p.segment_ids[0])
    real = segments > 0  # unused tokens' outputs are never read
    assert real.sum() == int(np.asarray(rows["attention_mask"]).sum(1)[np.asarray(mask) > 0].sum())
    for i in range(1, 13):  # no example crosses a block of 8 tokens
        assert len(set(np.flatnonzero(segments == i) // 8)) <= 1
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 100, 2, 4)) for i in range(3))
    full = padding_attention(q, k, v, attention_mask_for(None, p))
    np.testing.assert_allclose(stream_attention(q, k, v, p)[0, real], full[0, real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["padded", pytest.param("stream", marks=pytest.mark.slow),
                                    pytest.param("aligned", marks=pytest.mark.slow)])  # quick: padded
def test_last_layer_for_first_tokens_only_equals_the_full_encoder(layout):
    """A first-token head's encoder runs its last layer on first tokens alone: the same states
    (and gradients) as the full last layer read at each example's first token."""
    graphdef, params, frozen = _model("bert", "classification")
    rows = _rows("classification", b=6, length=8, seed=5)
    mask = jnp.ones(6).at[2].set(0.0)  # an empty slot in the packed layouts
    if layout == "padded":
        args, read = (rows["input_ids"], rows["attention_mask"], rows["token_type_ids"], None), lambda h: h[:, 0]
    else:  # 40 tokens in blocks of 8 (aligned) or one unaligned stream with a single mask
        packed, fits = pack(rows, mask, num_tokens=40, aligned=layout == "aligned")
        assert bool(fits)
        p = packed["packing"]
        args, read = (packed["input_ids"], None, packed["token_type_ids"], p), lambda h: h[0, p.starts]

    @functools.partial(jax.jit, static_argnums=1)
    def states(params, first_only):
        encoder = nnx.merge(graphdef, params, frozen).bert
        hidden = encoder(*args, first_tokens_only=first_only)
        return hidden if first_only else read(hidden)

    first, full = states(params, True), states(params, False)
    assert first.shape == full.shape == (6, BERT["hidden_size"])
    keep = np.ones(6, bool) if layout == "padded" else np.asarray(mask) > 0
    np.testing.assert_allclose(first[keep], full[keep], rtol=1e-5, atol=1e-6)
    grads = [jax.jit(jax.grad(lambda q, f=f: jnp.sum(jnp.where(keep[:, None], states(q, f), 0.0) ** 2)))(params)
             for f in (True, False)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_stream_length_matches_the_packed_stream():
    from fedlora_jax.data.packing import example_starts, stream_length

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=(20, 10))  # 20 batches of 10 rows of at most 8 tokens
    for block in (None, 8):
        ends = jax.jit(jax.vmap(lambda n: example_starts(n, block)[1]))(jnp.asarray(lengths, jnp.int32))
        np.testing.assert_array_equal(stream_length(lengths, block), ends)
    rows = _rows("classification", b=10, length=8, seed=1)
    need = int(stream_length(np.asarray(rows["attention_mask"]).sum(1), 8))
    assert bool(pack(rows, jnp.ones(10), num_tokens=need, aligned=True)[1])
    assert not bool(pack(rows, jnp.ones(10), num_tokens=need - 1, aligned=True)[1])


def test_eval_batch_count_is_the_number_of_batches_eval_batches_builds():
    from fedlora_jax.eval.evaluate import eval_batch_count, eval_batches

    rng = np.random.default_rng(0)
    for n in (1, 5, 33):
        lengths = rng.integers(1, 17, n)
        mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int32)
        arrays = {"input_ids": mask * 7, "attention_mask": mask}
        for num_tokens in (None, 32, 64):
            assert eval_batch_count(mask, 8, num_tokens) == eval_batches(arrays, 8, num_tokens)[1].shape[0]


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_decoder_stream_windows_equal_attention_over_the_whole_stream(sliding_window):
    """Block-by-block attention of a packed decoder stream (StreamWindows) gives the real tokens
    what the whole-stream causal, same-example mask gives, forward and backward."""
    from fedlora_jax.models.llama.attention import causal_mask, grouped_attention, stream_block, stream_windows

    rows = _rows("causal_lm", b=10, length=12, seed=3)
    packed, fits = pack(rows, jnp.ones(10), num_tokens=112)
    p = packed["packing"]
    block = stream_block(p.row_length, 112)
    assert bool(fits) and block is not None and block < p.row_length  # windows of several blocks
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 112, heads, 8)), jnp.float32) for heads in (4, 2, 2))
    real = (p.segment_ids[0] > 0)[None, :, None, None]
    weights = jnp.asarray(rng.normal(size=(1, 112, 4, 8)), jnp.float32) * real

    def whole(q, k, v):
        same = (p.segment_ids[:, :, None] == p.segment_ids[:, None, :]) & (p.segment_ids[:, None, :] > 0)
        mask = causal_mask(p.positions, p.positions, jnp.ones_like(p.segment_ids), sliding_window) & same[:, None]
        return jnp.sum(grouped_attention(q, k, v, mask) * weights)

    def windowed(q, k, v):
        windows = stream_windows(p.segment_ids, p.positions, p.row_length, block, sliding_window)
        return jnp.sum(windows.attend(q, k, v) * weights)

    want, got = jax.value_and_grad(whole, (0, 1, 2))(q, k, v), jax.value_and_grad(windowed, (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("block", [None, 8])
def test_scored_positions_alone_give_the_loss_and_gradient_of_every_logit(block):
    """A packed stream listing its scored positions (pack(score_tokens=S)) gives the per-example
    losses and gradients of the full-logit loss, taking logits at the S positions only."""
    from fedlora_jax.tasks import task_kind

    graphdef, params, frozen = split_model(_lm_with_head_matrix())
    rows = _rows("causal_lm", b=6, length=12, seed=1)
    mask = jnp.array([1, 1, 0, 1, 1, 1], jnp.float32)
    targets = np.asarray(rows["attention_mask"][:, 1:] * rows["loss_mask"][:, 1:]) * np.asarray(mask)[:, None]
    full, _ = pack(rows, mask, num_tokens=80)
    scored, fits = pack(rows, mask, num_tokens=80, score_tokens=int(targets.sum()))
    assert bool(fits) and not bool(pack(rows, mask, num_tokens=80, score_tokens=int(targets.sum()) - 1)[1])
    index = np.asarray(scored["packing"].score_index)
    np.testing.assert_array_equal(index, np.flatnonzero(np.asarray(scored["packing"].scored_next(scored["loss_mask"]))))
    kind = task_kind("causal_lm")

    def losses(params, batch, from_hidden):
        model = nnx.merge(graphdef, params, frozen)
        if not from_hidden:
            return kind.loss(forward(model, batch), batch)
        hidden = model.hidden_states(batch["input_ids"], packing=batch["packing"])
        return kind.loss_from_hidden(hidden, model.output_weight(), batch, block)

    def mean(params, batch, from_hidden):
        return jnp.sum(losses(params, batch, from_hidden) * mask)

    np.testing.assert_allclose(losses(params, scored, True) * mask, losses(params, full, False) * mask, rtol=1e-5)
    got, want = jax.grad(mean)(params, scored, True), jax.grad(mean)(params, full, False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _lm_with_head_matrix():
    """The tiny Llama with LoRA on its attention and MLP (the head stays a plain matrix) and
    non-zero B factors."""
    model = create_model("llama", LLAMA, task="causal_lm", seed=0)
    inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")), jax.random.key(1))
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, LoRALinear):
            layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(7), layer.lora_b[...].shape)
    assert model.output_weight() is not None
    return model
