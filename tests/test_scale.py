"""Scale: client rows stored once (each step gathers exactly the rows the samplers name, from
the client's own rows), streamed aggregation (a chunked round of a streaming method equals the
stacked round and its compiled memory does not grow with the cohort), and the stacking methods'
clear error when the cohort's states cannot fit."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.engine import LocalTrainer
from fedlora_jax.run import build_experiment, plan
from fedlora_jax.engine import RecordDP
from fedlora_jax.engine.client import _sample
from fedlora_jax.config import ConfigError
from fedlora_jax.data.base import federate
from fedlora_jax.methods import make_method, streaming_methods
from fedlora_jax.privacy import poisson_sample, shuffled_batch
from fedlora_jax.engine import device_shards, init_server_state
from tiny import tiny_config, tiny_experiment


def test_clients_rows_are_stored_once_and_steps_gather_what_the_samplers_name():
    rng = np.random.default_rng(0)
    sizes = [3, 40, 1, 17, 9]
    pool = {"input_ids": np.arange(sum(sizes) * 2, dtype=np.int32).reshape(-1, 2),
            "labels": rng.integers(0, 2, sum(sizes)).astype(np.int32)}
    parts = np.split(rng.permutation(sum(sizes)), np.cumsum(sizes)[:-1])
    data = federate(pool, parts, [p[:0] for p in parts], pool, "classification", 2)
    assert data.train["input_ids"].shape == (sum(sizes), 2)  # no padding to the largest client
    for u, part in enumerate(parts):
        np.testing.assert_array_equal(data.client_train(u)["input_ids"], pool["input_ids"][part])
    trainer = LocalTrainer(None, "classification", None, None, 1, 8, max_examples=max(sizes))
    poisson = dataclasses.replace(trainer, dp=RecordDP(1.0, 1.0, poisson=True, buffer_size=12))
    rows = jax.tree.map(jnp.asarray, data.train)
    for u, n in enumerate(sizes):
        own = data.client_train(u)["input_ids"]
        for seed in range(5):
            key = jax.random.key(seed)
            batch, mask, expected, _ = _sample(poisson, rows, data.train_offsets[u], n, key)
            index, want_mask, _ = poisson_sample(key, n, min(1.0, 8 / n), 12, max(sizes))
            np.testing.assert_array_equal(mask, want_mask)
            np.testing.assert_array_equal(np.asarray(batch["input_ids"])[want_mask], own[np.asarray(index)[want_mask]])
            assert float(expected) == pytest.approx(min(1.0, 8 / n) * n)
            batch, mask, _, _ = _sample(trainer, rows, data.train_offsets[u], n, key)
            index, want_mask = shuffled_batch(key, n, 8, max(sizes))
            np.testing.assert_array_equal(np.asarray(mask) > 0, np.asarray(want_mask) > 0)
            real = np.asarray(want_mask) > 0
            np.testing.assert_array_equal(np.asarray(batch["input_ids"])[real], own[np.asarray(index)[real]])


def chunks_of(summaries):
    return jax.tree.map(lambda *xs: sum(xs), *summaries)


@pytest.mark.parametrize("round_index", [0, 1])
def test_streamed_reductions_equal_the_stacked_aggregate(round_index):
    rng = np.random.default_rng(round_index)
    k, d_out, r, d_in = 7, 12, 3, 10
    b = jnp.asarray(rng.standard_normal((k, d_out, r)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((k, r, d_in)), jnp.float32)
    if round_index == 0:  # even round: A frozen and shared (FFA, RoLoRA's invariant)
        a = jnp.broadcast_to(a[0], a.shape)
    else:  # odd round: RoLoRA trained A with B shared
        b = jnp.broadcast_to(b[0], b.shape)
    w = jnp.asarray(rng.dirichlet(np.ones(k)), jnp.float32)
    streaming = streaming_methods() + ("fra_then_ffa",)  # (the hybrid needs an option to be built)
    assert {"fedit", "ffa", "rolora", "fedex", "fra"} <= set(streaming)
    options = {"fra": {"split": "left" if round_index else "balanced"},  # the hybrid: last FRA round, then FFA
               "fra_then_ffa": {"switch_round": 1}}
    for name in streaming:
        method = make_method(name, options.get(name), lora_rank=r)
        assert method.streaming, name
        if name == "ffa" and round_index == 1:
            continue
        stacked = method.aggregate(b, a, w, jnp.int32(round_index), jax.random.key(0))
        summary = chunks_of([method.summarise(b[s], a[s], w[s]) for s in (slice(0, 3), slice(3, 6), slice(6, 7))])
        ideal = jnp.einsum("k,kor,kri->oi", w, b, a)
        streamed = method.finalise(summary, ideal, b[0], a[0], jnp.int32(round_index), jax.random.key(0))
        for got, want in zip(streamed, stacked):
            if want is None:
                assert got is None, name
            else:
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(method.streamed_divergence(ideal, streamed), method.divergence(b, a, w, stacked),
                                   atol=1e-5, err_msg=name)


@pytest.mark.parametrize("method, options, rounds", [
    ("fedex", "{}", 2),
    pytest.param("fra_then_ffa", "{switch_round: 2}", 3, marks=pytest.mark.slow),  # quick twin: fedex
])
def test_streamed_round_equals_the_stacked_round(method, options, rounds):
    """FedEx: means, the dense ideal update and the base fold all streamed; FRA then FFA: the
    dense SVD of the streamed M (balanced, then left) against the stacked factors' SVD, then
    FFA (the other streaming methods' reductions: the test above)."""
    exp = tiny_experiment(**{"federation.method": method, "federation.method_options": options,
                             "federation.clients_per_chunk": 2, "eval.local": False, "data.packing": "null"})
    fed = exp.federation
    assert fed.streams and not dataclasses.replace(fed, keep_client_params=True).streams
    shards = device_shards(exp.data)
    streamed = stacked = init_server_state(exp.params, exp.frozen, 0, fed)
    play_streamed, play_stacked = jax.jit(fed.round), jax.jit(dataclasses.replace(fed, keep_client_params=True).round)
    for _ in range(rounds):
        streamed, out = play_streamed(streamed, shards)
        stacked, want = play_stacked(stacked, shards)
        assert out.client_params is None
        for got, expected in zip(jax.tree.leaves((streamed.params, streamed.frozen)),
                                 jax.tree.leaves((stacked.params, stacked.frozen))):
            np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(out.divergence, want.divergence, atol=1e-5)
        np.testing.assert_allclose(out.train_loss, want.train_loss, atol=1e-6)


@pytest.mark.slow  # quick twin: test_streamed_reductions_equal_the_stacked_aggregate
def test_streamed_round_memory_does_not_grow_with_the_cohort():
    """Compiled temporary + output bytes of the round: flat for the streamed round, growing with
    the cohort for the stacked one (the [K, ...] trained states)."""
    sizes = {}
    for k in (16, 128):
        exp = tiny_experiment(**{"federation.clients_per_chunk": 8, "eval.local": False, "data.num_clients": k,
                                 "federation.clients_per_round": k, "data.examples_per_client": [5, 20],
                                 "data.packing": "null", "federation.local_steps": 1})
        fed, shards = exp.federation, device_shards(exp.data)
        state = init_server_state(exp.params, exp.frozen, 0, fed)
        variants = [("streamed", fed), ("stacked", dataclasses.replace(fed, keep_client_params=True))]
        for name, f in variants:
            memory = jax.jit(f.round).lower(state, shards).compile().memory_analysis()
            sizes[name, k] = memory.temp_size_in_bytes + memory.output_size_in_bytes
    per_client = int(sum(x.nbytes for x in jax.tree.leaves(exp.params)))
    assert sizes["streamed", 128] <= 1.1 * sizes["streamed", 16]
    # the stacked round grows by every added client's trained state: the stack the streamed round avoids
    assert sizes["stacked", 128] - sizes["stacked", 16] >= (128 - 16) * per_client


def test_a_stacking_method_whose_cohort_cannot_fit_is_refused_with_one_line(monkeypatch):
    monkeypatch.setattr(plan, "memory_available", lambda: 10_000)
    with pytest.raises(ConfigError, match=r"method 'flora_na' aggregates the whole cohort at once: 5 clients' trained "
                                          r"states take .* lower federation.clients_per_round"):
        build_experiment(tiny_config(**{"federation.method": "flora_na"}))
    build_experiment(tiny_config(**{"federation.method": "fedit", "federation.clients_per_chunk": 2,
                                             "eval.local": False}))  # streams: fits


@pytest.mark.slow  # quick twin: test_devices.py (2 devices against 1, in process)
def test_four_devices_give_the_rounds_of_one(tmp_path):
    """The cohort's client axis sharded over 4 simulated CPU devices (cohort 5: padded to 8) gives
    one device's rounds, streamed and stacked, and evaluation shared out over them one device's
    metrics, global and local; runs in a subprocess (the device count is fixed
    when JAX starts)."""
    import os
    import subprocess
    import sys

    script = """
import dataclasses, sys
import jax, numpy as np
from fedlora_jax.engine import device_shards, init_server_state
from tiny import tiny_experiment
assert jax.local_device_count() == 4
for local in (False, True):  # streamed (no local evaluation), stacked
    exp = tiny_experiment(**{"data.packing": "null", "federation.clients_per_chunk": 2, "eval.local": local})
    one = dataclasses.replace(exp.federation, devices=1)
    assert exp.federation.devices == 4 and one.streams == (not local)
    shards = device_shards(exp.data)
    a = init_server_state(exp.params, exp.frozen, 0, one)
    b = exp.federation.replicated(a)  # placed as runs place it
    placed = exp.federation.replicated(shards)
    for _ in range(2):
        a, out_a = jax.jit(one.round)(a, shards)
        b, out_b = exp.federation.compile_round()(b, placed)
        for x, y in zip(jax.tree.leaves((a.params, out_a.train_loss, out_a.divergence)),
                        jax.tree.leaves((b.params, out_b.train_loss, out_b.divergence))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    # evaluation shares its batches out over the devices (padded to a multiple of 4)
    cohort, mask = np.asarray(out_a.cohort), np.asarray(out_a.cohort_mask)
    one_eval, four_eval = dataclasses.replace(exp, federation=one).evaluation(), exp.evaluation()
    assert four_eval.global_index.shape[0] % 4 == 0 and four_eval.local_num_batches % 4 == 0
    m1 = one_eval.metrics(a, a.frozen, out_a.client_params, cohort, mask, "accuracy")
    m4 = four_eval.metrics(b, b.frozen, out_b.client_params, cohort, mask, "accuracy")
    assert m1.keys() == m4.keys() and ("local_accuracy" in m1) == local
    for key in m1.keys() - {"eval_s"}:
        np.testing.assert_allclose(m4[key], m1[key], atol=1e-5, err_msg=key)
print("same")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "same" in proc.stdout, proc.stderr[-3000:]
    with pytest.raises(ConfigError, match="'federation.devices' is 3 but this process sees 2"):
        build_experiment(tiny_config(**{"federation.devices": 3}))


@pytest.mark.parametrize("cohort, cores, expected", [(8, 2, 2), (5, 2, 2), (1, 2, 1), (8, 16, 8), (10, 4, 4),
                                                      (12, 8, 6), (7, 1, 1)])
def test_auto_cpu_devices_give_each_core_the_smallest_share(cohort, cores, expected):
    """One device per core, or fewer when they give the same share (10 clients on 4 cores: 4
    devices of 3, padded; 12 on 8: 6 of 2), as long as their copies fit a quarter of memory."""
    devices = plan.cpu_device_count(cohort, cores)
    assert devices == expected
    share = -(-cohort // devices)
    assert devices <= max(1, min(cores, cohort)) and share == -(-cohort // max(1, min(cores, cohort)))
    assert devices == 1 or -(-cohort // (devices - 1)) > share  # one device fewer gives a larger share
    assert plan.cpu_device_count(cohort, cores, copy_bytes=2**30, memory_bytes=2 * 2**30 * 4) == min(expected, 2)
    assert plan.cpu_device_count(cohort, cores, copy_bytes=2**30, memory_bytes=2**30) == 1


def test_auto_cpu_devices_keep_the_devices_of_a_started_jax(monkeypatch):
    """Once JAX has started (here with conftest's two devices), ``auto`` keeps its devices whatever
    it would have chosen, and a number that differs is one clear error."""
    monkeypatch.setattr(plan, "cpu_devices_set_elsewhere", lambda: False)  # conftest pins the count
    monkeypatch.setattr(plan, "host_cores", lambda: 4)
    assert plan.cpu_device_count(5, 4) == 3 and jax.device_count() == 2
    assert build_experiment(tiny_config()).federation.devices == 2
    with pytest.raises(ConfigError, match=r"'federation.cpu_devices' is 3 but JAX already started with 2 CPU device"):
        build_experiment(tiny_config(**{"federation.cpu_devices": 3}))


@pytest.mark.slow  # quick twins: test_auto_cpu_devices_keep_the_devices_of_a_started_jax, test_devices.py's README run
def test_cpu_devices_split_the_cores_of_a_fresh_process():
    """In a process where building the experiment starts JAX, ``auto`` splits the cores
    (:func:`fedlora_jax.run.plan.cpu_device_count`) and the mesh trains on every device; once JAX
    has started, auto keeps its devices and another number is one clear error. A count fixed by
    XLA_FLAGS is left alone (test_four_devices_give_the_rounds_of_one)."""
    import os
    import subprocess
    import sys

    script = """
import jax, sys
from fedlora_jax.run import build_experiment, plan
from fedlora_jax.config import ConfigError, cohort_size
from tiny import tiny_config
config = tiny_config(**{"data.packing": "null", "federation.cpu_devices": sys.argv[1]})
exp = build_experiment(config)
data = exp.data
expected = (plan.cpu_device_count(cohort_size(config), plan.host_cores(),
                                      plan.weight_file_bytes(config) + sum(x.nbytes for x in data.train.values()),
                                      plan.host_memory()) if sys.argv[1] == "auto" else int(sys.argv[1]))
assert jax.device_count() == expected == exp.federation.devices, (jax.device_count(), expected)
try:
    build_experiment(tiny_config(**{"federation.cpu_devices": expected + 1}), data)
    raise SystemExit("no error")
except ConfigError as e:
    assert f"is {expected + 1} but JAX already started with {expected} CPU device(s)" in str(e), e
assert build_experiment(tiny_config(**{"federation.cpu_devices": "auto"}), data).federation.devices == expected
print("devices", expected)
"""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    for wanted in ("auto", "3"):
        proc = subprocess.run([sys.executable, "-c", script, wanted], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0 and "devices" in proc.stdout, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == 3


@pytest.mark.slow  # quick twin: test_devices.py (the clients mesh over 2 devices of one process)
def test_two_processes_give_the_metrics_of_one(tmp_path, capsys):
    """`fedlora-jax run` in two local CPU processes joined by jax.distributed (one device each,
    the cohort of 5 padded to 6) logs the metrics of a one-process run, with local evaluation of
    the replicated trained states and a checkpoint every round; process 0 alone writes. An
    incomplete or wrong process spec is one line."""
    import json
    import os
    import socket
    import subprocess
    import sys

    import yaml

    from fedlora_jax.cli import main
    from tiny import TINY

    config = {**TINY, "federation": {**TINY["federation"], "rounds": 2}, "checkpoint": {"every": 1}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    for flags, message in ((["--coordinator", "127.0.0.1:1"], "needs the coordinator address, the process count"),
                           (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "must be in 0..1")):
        assert main(["run", str(path), "--out", str(tmp_path / "bad"), *flags]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "fedlora_jax", "run", str(path), "--out", str(tmp_path / "two"),
                               "--quiet", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]

    def metrics(run):
        timing = ("wall_s", "eval_s")
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = metrics("one"), metrics("two")
    assert [r["round"] for r in two] == [1, 2] and one[0].keys() == two[0].keys() and "local_accuracy" in two[0]
    for a, b in zip(one, two):
        for key in a:
            np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)
    from safetensors.numpy import load_file

    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["round_000001", "round_000002"]
    one_state, two_state = (load_file(tmp_path / run / "checkpoints/round_000002/state.safetensors")
                            for run in ("one", "two"))
    assert one_state.keys() == two_state.keys()
    for name in one_state:
        np.testing.assert_allclose(two_state[name], one_state[name], atol=1e-5, err_msg=name)
