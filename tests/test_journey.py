"""A user's journey through the command line, each step a fresh process with the defaults a user
gets (no device count pinned: `federation.cpu_devices: auto` splits this machine's cores, packing
on): `run` with checkpoints, `kill -9` mid-run, `resume`, `export` (loaded with PEFT's
`PeftModel.from_pretrained`, giving the run's logits), `describe`, and `compare` of two methods
over two seeds. Each step's exit status and outputs are checked."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from fedlora_jax.run.checkpoint import Checkpointer, config_digest
from fedlora_jax.config import cohort_size, load_config
from fedlora_jax.run import build_experiment
from fedlora_jax.run.plan import cpu_device_count, host_cores
from fedlora_jax.run.export import template_state
from processes import kill_after_first_checkpoint, user_env

# quick twins: test_devices.py's README quickstart in a fresh process, test_checkpoint.py's Ctrl-C
# resume, test_cli.py's in-process run, test_export.py's PEFT parity, test_compare.py's compare
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
ROUNDS = 30
# the quickstart, a little smaller; long enough that a kill after round 2's checkpoint lands mid-run
SETTINGS = ["--set", f"federation.rounds={ROUNDS}", "--set", "checkpoint.every=2", "--set", "eval.every=10",
            "--set", "federation.local_steps=4"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``fedlora-jax ARGS`` in a fresh process; with ``check``, exit 0 or the output in the failure."""
    done = subprocess.run([sys.executable, "-m", "fedlora_jax", *args], cwd=ROOT, env=user_env(), capture_output=True,
                          text=True, timeout=540)
    if check:
        assert done.returncode == 0, f"fedlora-jax {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_model_logits(run_dir: Path, rows: int = 8):
    """The resumed run's final global model (its newest checkpoint) on the first test rows."""
    config = load_config(run_dir / "config.yaml")
    exp = build_experiment(config)
    method = exp.federation.method
    checkpoints = Checkpointer(run_dir, config_digest(config.to_dict()), config.checkpoint.keep, method.modifies_base)
    state = checkpoints.latest(template_state(exp.params, exp.frozen, method, config.data.num_clients),
                               lambda message: None).state
    ids = exp.data.global_test["input_ids"][:rows]
    mask = exp.data.global_test["attention_mask"][:rows]
    logits = nnx.merge(exp.graphdef, state.params, state.frozen)(jnp.asarray(ids), jnp.asarray(mask))
    return ids, mask, np.asarray(jax.device_get(logits), np.float64)


def test_run_kill_resume_export_describe_compare(tmp_path):
    run_dir = tmp_path / "run"
    kill_after_first_checkpoint([QUICKSTART, "--out", str(run_dir), "--quiet", *SETTINGS], run_dir, user_env())
    newest = sorted(p.name for p in (run_dir / "checkpoints").glob("round_*"))[-1]
    killed_at = len(records(run_dir))
    assert killed_at < ROUNDS and newest < f"round_{ROUNDS:06d}", "the kill landed after the run's end"
    assert not (run_dir / "summary.json").exists()

    resumed = cli("resume", str(run_dir))
    assert f"after round {int(newest.split('_')[1])} ({newest})" in resumed.stdout + resumed.stderr
    history = records(run_dir)
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    assert all(np.isfinite(r["train_loss"]) for r in history)
    summary = json.loads((run_dir / "summary.json").read_text())
    cohort = cohort_size(load_config(run_dir / "config.yaml"))
    assert summary["rounds"] == ROUNDS and summary["devices"] == f"{cpu_device_count(cohort, host_cores())} x cpu"
    assert summary["final_global_accuracy"] > 0.8  # the quickstart task is learnt after the kill and resume
    assert history[-1]["local_accuracy"] > 0.8

    adapter_dir = tmp_path / "adapter"
    exported = cli("export", str(run_dir), "--out", str(adapter_dir))
    assert str(adapter_dir) in exported.stdout
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(adapter_dir / adapter["base_model_name_or_path"]), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids, mask, ours = final_model_logits(run_dir)
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)

    heatmap = tmp_path / "clients.png"
    described = cli("describe", QUICKSTART, "--out", str(heatmap))
    assert "10 clients" in described.stdout and heatmap.stat().st_size > 0

    comparison = tmp_path / "comparison"
    compared = cli("compare", QUICKSTART, "--methods", "fedit,ffa", "--seeds", "0,1", "--out", str(comparison),
                   "--set", "federation.rounds=3", "--set", "eval.every=3")
    assert compared.stdout.count("comparison directory") == 1
    with open(comparison / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({(r["method"], r["seed"]) for r in rows}) == [
        ("fedit", "0"), ("fedit", "1"), ("ffa", "0"), ("ffa", "1")]
    for method in ("fedit", "ffa"):
        for seed in (0, 1):
            assert len(records(comparison / method / f"seed{seed}")) == 3
    with open(comparison / "paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert [(r["method"], r["reference"], r["pairs"]) for r in paired] == [("ffa", "fedit", "2")] * 2
    assert {r["metric"] for r in paired} == {"final_global_accuracy", "best_global_accuracy"}
    for plot in ("accuracy.png", "divergence.png", "bytes.png"):
        assert (comparison / plot).stat().st_size > 0, plot
