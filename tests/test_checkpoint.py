"""Checkpoints and resume: a run killed with SIGKILL and resumed ends with the same metrics (every
field but timings) and bit-identical final parameters as an uninterrupted run; Ctrl-C stops after
the current round with a checkpoint; a corrupt newest checkpoint falls back to the previous one;
a changed config is refused with one line."""

import shutil
from pathlib import Path

import pytest
import yaml

from fedlora_jax.cli import main
from processes import kill_after_first_checkpoint, press_ctrl_c_in_round
from rundirs import assert_same_run, metrics_without_timings

ROOT = Path(__file__).resolve().parents[1]
# One device everywhere, so the runs match bit for bit (a different device count changes float
# rounding): cpu_devices=null leaves the killed subprocess JAX's single CPU device, and devices=1
# pins the in-process runs (2 CPU devices, see conftest.py) and the in-process resume of the killed
# run (same config) to the first of them.
SMALL = ["--set", "federation.rounds=6", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=2",
         "--set", "eval.every=3", "--set", "federation.clients_per_round=3",
         "--set", "model.config.num_hidden_layers=1",
         "--set", "federation.local_steps=2", "--set", "eval.local=false", "--set", "data.test_examples=64",
         "--set", "data.packing=null", "--set", "federation.cpu_devices=null", "--set", "federation.devices=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet", *SMALL]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round_000004", "round_000006"]  # keep 2
    return out


@pytest.mark.slow  # quick twins: the Ctrl-C and corrupt-checkpoint resumes below
def test_sigkill_then_resume_equals_an_uninterrupted_run(reference, tmp_path, capsys):
    out = tmp_path / "run"
    kill_after_first_checkpoint([str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet", *SMALL], out)
    # the kill landed mid-run: the newest checkpoint is older than the final round 6 and fewer than
    # 6 rounds are logged, so the resume below has rounds to run
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("round_*"))
    assert checkpoints and checkpoints[-1] in ("round_000002", "round_000004"), checkpoints
    killed_after = int(checkpoints[-1].removeprefix("round_"))
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    assert killed_after <= logged < 6, (checkpoints, logged)
    capsys.readouterr()
    assert main(["resume", str(out), "--quiet"]) == 0
    assert f"after round {killed_after} ({checkpoints[-1]})" in capsys.readouterr().err  # from that checkpoint
    assert_same_run(out, reference)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_ctrl_c_stops_after_the_round_with_a_checkpoint(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    press_ctrl_c_in_round(monkeypatch, 3)
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet", *SMALL]) == 130
    assert "interrupted after round 3; continue with: fedlora-jax resume" in capsys.readouterr().err
    assert metrics_without_timings(out) == metrics_without_timings(reference)[:3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round_000002", "round_000003"]
    assert (out / "summary.json").is_file()  # resuming from there is the SIGKILL test's path


def test_corrupt_newest_checkpoint_falls_back_and_changed_config_is_refused(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / "round_000006" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100] + b"\0" * 100)
    assert main(["resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "round_000006 is corrupt" in err and "falling back to the previous checkpoint" in err
    assert "after round 4" in err
    assert_same_run(out, reference)  # rounds 5 and 6 ran again and came out the same

    config = yaml.safe_load((out / "config.yaml").read_text())
    config["optim"]["learning_rate"] = 0.5
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["resume", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("fedlora-jax: error: checkpoint") and "different config" in lines[-1]
    assert main(["resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
