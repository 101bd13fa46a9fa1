"""The engine on 2 devices against 1, where users run it: the conftest's 2 CPU devices are what
`federation.cpu_devices: auto` gives on a 2-core machine, and `federation.devices` null shards the
cohort over both. Each case runs the same config with `federation.devices` null (2) and 1 and
compares metrics.jsonl (every field but timings, to 1e-5) and the final checkpoint's state.

The cohort of 5 (3 under user-level DP) does not divide by 2, so a padded slot rides along on the
second device; the global test set's batch count is odd (padded and packed), so evaluation pads
its batch axis to the device count too. The last test runs the README's first command in a fresh
process whose device count nobody pinned.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fedlora_jax.eval import evaluate
from fedlora_jax.eval import evaluation as evaluation_module
from fedlora_jax.run import plan
from fedlora_jax.cli import main
from fedlora_jax.config import cohort_size, load_config
from fedlora_jax.data.packing import eval_stream_length
from fedlora_jax.run import build_data, build_experiment, run
from processes import user_env
from rundirs import assert_same_run, final_state, metrics_without_timings
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]

# 80 test rows in batches of 16: 5 padded batches, 7 packed ones (asserted below), both odd
BASE = {"data.test_examples": 80, "eval.batch_size": 16, "federation.rounds": 2, "federation.local_steps": 2,
        "eval.every": 1}
CASES = {
    # packed local steps and packed evaluation batches
    "packed": {"data.packing": "auto"},
    # padded rows; 4 rounds with a checkpoint after round 2, which the resume test restarts from
    "padded": {"data.packing": "null", "federation.rounds": 4, "checkpoint.every": 2, "checkpoint.keep": 3},
    # DP-SGD (Poisson batches, book-keeping per-example gradients), sigma calibrated to a target, a
    # clip norm far below the per-example gradient norms (clipping binds)
    "record_dp": {"data.packing": "null", "privacy.record_level": True, "privacy.target_epsilon": 4.0,
                  "privacy.clip_norm": 0.01, "eval.local": False},
    # DP-FedAvg: a cohort of 3 on 2 devices pads to 4; noise added once at the server
    "user_dp": {"data.packing": "null", "federation.clients_per_round": 3, "privacy.user_level": True,
                "privacy.user_noise_multiplier": 1.0, "privacy.user_clip_norm": 0.05, "eval.local": False},
}


def assert_close_runs(got: Path, want: Path, atol: float = 1e-5) -> None:
    """Same rounds, same metric keys, values within ``atol``; final states within ``atol``."""
    a, b = metrics_without_timings(got), metrics_without_timings(want)
    assert [r["round"] for r in a] == [r["round"] for r in b] and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in y:
            np.testing.assert_allclose(x[key], y[key], atol=atol, rtol=0, err_msg=f"round {y['round']}: {key}")
    sa, sb = final_state(got), final_state(want)
    assert sa.keys() == sb.keys()
    for name in sb:
        np.testing.assert_allclose(sa[name], sb[name], atol=atol, rtol=0, err_msg=name)


def config_of(case: str, devices):
    overrides = {**BASE, **CASES[case], "federation.devices": "null" if devices is None else devices}
    return tiny_config(**overrides)


class Pair:
    """One case run on every device (2) and on 1 device, into run directories."""

    def __init__(self, case: str, root: Path):
        self.case, self.root = case, root
        self.config2, self.config1 = config_of(case, None), config_of(case, 1)
        self.exp2 = build_experiment(self.config2)
        self.exp1 = build_experiment(self.config1, self.exp2.data)
        assert self.exp2.federation.devices == jax.device_count() == 2 and self.exp1.federation.devices == 1
        self.dir2, self.dir1 = root / "two", root / "one"
        self.result2 = run(self.config2, self.dir2, progress=False, experiment=self.exp2)
        self.result1 = run(self.config1, self.dir1, progress=False, experiment=self.exp1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Lazily built pairs, each shared by the tests that read it."""
    built: dict[str, Pair] = {}

    def get(case: str) -> Pair:
        if case not in built:
            built[case] = Pair(case, tmp_path_factory.mktemp(case))
        return built[case]

    return get


# ------------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("case", ["packed", pytest.param("padded", marks=pytest.mark.slow)])  # quick: packed
def test_evaluation_on_two_devices_gives_the_metrics_of_one(pairs, case):
    """Global and local metrics every round, packed and padded batches: the odd batch count is
    padded to a multiple of the devices with empty batches that score nothing."""
    pair = pairs(case)
    ev = pair.exp2.evaluator
    unpadded = evaluate.eval_batch_count(pair.exp2.data.global_test["attention_mask"], ev.batch_size, ev.num_tokens)
    assert unpadded % 2 == 1 and (ev.num_tokens is not None) == (case == "packed")
    assert pair.exp2.evaluation().global_index.shape[0] == unpadded + 1  # one empty batch for the second device
    records = metrics_without_timings(pair.dir2)
    assert all({"global_accuracy", "global_loss", "local_accuracy", "local_loss"} <= r.keys() for r in records)
    assert_close_runs(pair.dir2, pair.dir1)


def test_old_pad_rows_fails_on_packed_batches(pairs, monkeypatch):
    """The evaluation of the packed case on 2 devices goes through ``pad_rows`` with a batch
    holding a ``Packing``: the dict-only version it replaced crashes there (a guard that the test
    above covers that path)."""

    def dict_only_pad_rows(arrays: dict, multiple: int, axis: int = 0) -> dict:
        n = next(iter(arrays.values())).shape[axis]
        extra = (-n) % multiple
        if not extra:
            return dict(arrays)
        out = {}
        for k, v in arrays.items():
            widths = [(0, 0)] * v.ndim
            widths[axis] = (0, extra)
            out[k] = np.pad(v, widths)
        return out

    pair = pairs("packed")
    monkeypatch.setattr(evaluation_module, "pad_rows", dict_only_pad_rows)
    with pytest.raises(AttributeError, match="'Packing' object has no attribute 'ndim'"):
        pair.exp2.evaluation()
    pair.exp1.evaluation()  # one device pads nothing


# ------------------------------------------------------------------------------------------ training


def test_packed_training_on_two_devices_gives_the_rounds_of_one(pairs):
    """Each device packs its share of the cohort (its own groups and token buckets): the same
    rounds as one device packing all of it."""
    pair = pairs("packed")
    assert pair.exp2.federation.trainer.streams.token_buckets and pair.exp1.federation.trainer.streams.token_buckets
    assert_close_runs(pair.dir2, pair.dir1)


@pytest.mark.slow  # quick twins: test_privacy_engine.py (record-level DP rounds on 2 devices), the user-level case
def test_record_level_dp_on_two_devices_gives_the_rounds_of_one(pairs):
    """DP-SGD with per-example clipping and calibrated noise: every client's noise comes from its
    own key (split from the round key over the cohort, before sharding), so 2 devices draw the
    noise 1 device draws, and the rounds agree to float rounding."""
    pair = pairs("record_dp")
    fed2, fed1 = pair.exp2.federation, pair.exp1.federation
    assert fed2.trainer.dp is not None and fed2.trainer.dp.noise_multiplier > 0 and fed2.trainer.bookkeeping
    assert fed2.trainer.dp.noise_multiplier == fed1.trainer.dp.noise_multiplier
    records = metrics_without_timings(pair.dir2)
    assert all(0 < r["epsilon"] <= 4.0 for r in records) and records[0]["epsilon"] < records[-1]["epsilon"]
    assert_close_runs(pair.dir2, pair.dir1)


@pytest.mark.slow  # quick twin: test_user_level_dp_mean_on_two_devices_is_over_the_three_real_clients
def test_user_level_dp_on_two_devices_gives_the_rounds_of_one(pairs):
    """DP-FedAvg with a cohort of 3 on 2 devices (padded to 4): the padded slot weighs nothing and
    the server adds its noise once to the cohort's clipped sum, as on 1 device."""
    pair = pairs("user_dp")
    fed2 = pair.exp2.federation
    assert fed2.cohort_size == 3 and fed2.user_dp is not None and fed2.user_dp.noise_multiplier == 1.0
    records = metrics_without_timings(pair.dir2)
    assert all(r["user_epsilon"] > 0 for r in records)
    assert_close_runs(pair.dir2, pair.dir1)


def test_user_level_dp_mean_on_two_devices_is_over_the_three_real_clients(pairs):
    """One compiled 2-device round without noise or clipping: the new global model is the old one
    plus the 3 clients' mean update, exactly; the padded fourth slot adds nothing and the
    denominator stays 3."""
    from fedlora_jax.engine import device_shards, init_server_state

    config = tiny_config(**{**BASE, **CASES["user_dp"], "privacy.user_noise_multiplier": 0.0,
                            "privacy.user_clip_norm": 1e6, "eval.local": True})
    exp = build_experiment(config, pairs("user_dp").exp2.data)
    fed = exp.federation
    assert fed.devices == 2 and fed.cohort_size == 3
    state = init_server_state(exp.params, exp.frozen, config.seed, fed)
    before = jax.device_get(state.params)
    new, out = fed.compile_round(donate=False)(state, fed.replicated(device_shards(exp.data)))
    assert np.asarray(out.cohort).shape == (3,) and np.asarray(out.cohort_mask).all()
    for g, c, n in zip(jax.tree.leaves(before), jax.tree.leaves(out.client_params), jax.tree.leaves(new.params)):
        c = np.asarray(c, np.float64)
        assert c.shape[0] == 3
        np.testing.assert_allclose(np.asarray(n), np.asarray(g) + (c - np.asarray(g)).sum(axis=0) / 3, atol=1e-6)


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow  # quick twin: test_paths.py's resumes (in process, on 2 devices)
def test_resume_on_two_devices_equals_the_uninterrupted_run(pairs, tmp_path):
    """The padded case's 2-device run directory with its round-4 checkpoint deleted: `resume`
    restarts after round 2 on 2 devices and ends bit for bit as the uninterrupted run (metrics
    and state), and so within tolerance of the 1-device run."""
    pair = pairs("padded")
    out = tmp_path / "run"
    shutil.copytree(pair.dir2, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round_000002", "round_000004"]
    shutil.rmtree(out / "checkpoints" / "round_000004")
    assert main(["resume", str(out), "--quiet"]) == 0
    assert_same_run(out, pair.dir2)
    assert int(final_state(out)["round"]) == 4
    assert json.loads((out / "summary.json").read_text())["devices"] == "2 x cpu"
    assert_close_runs(out, pair.dir1)


# ------------------------------------------------------------------------------------------ the README


def test_readme_quickstart_runs_on_the_devices_auto_gives(tmp_path):
    """`python -m fedlora_jax run configs/quickstart.yaml` in a fresh process whose device count
    nothing pins: `cpu_devices: auto` splits the cores (2 devices on 2 cores for the cohort of 5),
    every round evaluates globally and locally (packed batches, an odd count padded to the
    devices), and summary.json names the mesh."""
    out = tmp_path / "quickstart"
    command = [sys.executable, "-m", "fedlora_jax", "run", "configs/quickstart.yaml", "--out", str(out), "--quiet",
               "--set", "federation.rounds=2", "--set", "eval.every=1"]
    proc = subprocess.run(command, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = load_config(ROOT / "configs/quickstart.yaml")
    backend = jax.default_backend()  # an accelerator's devices are all used; CPU cores are split by auto
    devices = (plan.cpu_device_count(cohort_size(config), plan.host_cores()) if backend == "cpu"
               else jax.device_count())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == f"{devices} x {backend}"
    mask = build_data(config).global_test["attention_mask"]  # the packed global test batches
    batches = evaluate.eval_batch_count(mask, config.eval.batch_size, eval_stream_length(mask, config.eval.batch_size))
    assert devices == 1 or batches % devices  # do not divide by the devices: padding ran
    records = metrics_without_timings(out)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["global_accuracy"] <= 1 and 0 <= r["local_accuracy"] <= 1
    assert "final_global_accuracy" in summary and "final_local_accuracy" in summary
