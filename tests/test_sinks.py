"""Logging sinks: what each library stored, read back with that library (TensorBoard's event
accumulator, wandb's offline run file, an MLflow file store)."""

import json
import math
import struct
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedlora_jax.run.sinks import MLFLOW_PARAM_LENGTH, flat_params, open_sinks, scalars

CONFIG = {"name": "tiny", "seed": 3, "federation": {"rounds": 3, "method": "fedit"},
          "data": {"load": {"task": "sst2", "dir": "x" * 600}}, "eval": {"metrics": ["accuracy", "f1"]},
          "model": {"pretrained": None}}
# what a run logs (run/loop.py's round records): numbers, bools, a non-finite epsilon, strings,
# None and per-module divergence under "modules"
RECORDS = [{"round": r, "train_loss": 1.0 / r, "divergence": 0.1 * r, "bytes_up": 1000 * r,
            "cohort_overflow": r == 2, "epsilon": math.inf if r == 1 else 2.0 * r, "note": "text",
            "global_accuracy": None, "modules": {"layer.0.query": 0.01 * r, "layer.0.value": 0.02 * r}}
           for r in (1, 2, 3)]
SUMMARY = {"rounds": 3, "final_train_loss": 1 / 3, "total_bytes_up": 6000, "mean_divergence": float("nan"),
           "devices": "2 x cpu", "stopped": "interrupted after round 3"}
LOGGED = {"train_loss", "divergence", "bytes_up", "cohort_overflow", "epsilon", "modules/layer.0.query",
          "modules/layer.0.value"}  # the names a round logs: not round, note, global_accuracy (None)
SUMMARY_NUMBERS = {"rounds": 3.0, "final_train_loss": 1 / 3, "total_bytes_up": 6000.0}


def round_scalars(record: dict) -> dict[str, float]:
    """What a round record logs: its scalars but the round (the step)."""
    return scalars({key: value for key, value in record.items() if key != "round"})


def expected(name: str) -> list[tuple[int, float]]:
    """(step, value) of every round that logged ``name``."""
    return [(r["round"], v) for r in RECORDS if (v := round_scalars(r).get(name)) is not None]


def run_sinks(tmp_path, **options):
    """Logs RECORDS and SUMMARY to the sinks ``options`` configure, with tmp_path/run as run directory."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = {"tensorboard": False, "wandb": None, "mlflow": None} | options
    with open_sinks(**settings, run_dir=run_dir, run_name="tiny-fedit", config=CONFIG) as sinks:
        for record in RECORDS:
            sinks.round(record)
        sinks.summary(SUMMARY)
    return run_dir


def test_scalars_keep_finite_numbers_bools_as_numbers_and_nest_mappings():
    record = {"a": 1, "b": 2.5, "c": True, "d": False, "e": np.float32(0.5), "f": np.int64(7), "g": "text",
              "h": None, "i": [1.0], "j": math.nan, "k": -math.inf, "m": {"x.y": 0.25, "deeper": {"z": 1}, "s": "t"}}
    assert scalars(record) == {"a": 1.0, "b": 2.5, "c": 1.0, "d": 0.0, "e": 0.5, "f": 7.0, "m/x.y": 0.25,
                               "m/deeper/z": 1.0}
    assert all(type(v) is float for v in scalars(record).values())


def test_flat_params_dotted_json_values_cut_to_mlflow_limit():
    params = flat_params(CONFIG)
    assert params["federation.rounds"] == "3" and params["federation.method"] == "fedit"
    assert params["eval.metrics"] == '["accuracy", "f1"]' and params["model.pretrained"] == "null"
    long = params["data.load.dir"]
    assert len(long) == MLFLOW_PARAM_LENGTH and long == "x" * (MLFLOW_PARAM_LENGTH - 3) + "..."
    assert set(params) == {"name", "seed", "federation.rounds", "federation.method", "data.load.task",
                           "data.load.dir", "eval.metrics", "model.pretrained"}


def read_tensorboard(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_tensorboard_event_file_holds_every_logged_scalar_at_its_round(tmp_path):
    events = read_tensorboard(run_sinks(tmp_path, tensorboard=True) / "tensorboard")
    summary_tags = {f"summary/{k}" for k in SUMMARY_NUMBERS}
    assert set(events.Tags()["scalars"]) == LOGGED | summary_tags
    for name in LOGGED:
        stored = [(e.step, e.value) for e in events.Scalars(name)]
        assert stored == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected(name)], name
    assert [e.step for e in events.Scalars("epsilon")] == [2, 3]  # round 1's infinite epsilon is left out
    assert [e.value for e in events.Scalars("cohort_overflow")] == [0.0, 1.0, 0.0]
    for name, value in SUMMARY_NUMBERS.items():  # the summary at the last round; its NaN left out
        assert [(e.step, e.value) for e in events.Scalars(f"summary/{name}")] == [(3, pytest.approx(value))]
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    assert {tag: [(t.step, t.tensor_proto.string_val) for t in stored] for tag, stored in texts.items()} == {
        "summary/devices/text_summary": [(3, [b"2 x cpu"])],
        "summary/stopped/text_summary": [(3, [b"interrupted after round 3"])]}


def test_tensorboard_reopened_in_the_same_second_keeps_both_event_files(tmp_path):
    log_dir = tmp_path / "tensorboard"
    for rounds in ((1, 2), (3, 4)):  # a resumed run's second writer, opened at once
        with open_sinks(True, None, None, tmp_path, "tiny", CONFIG) as sinks:
            for r in rounds:
                sinks.round({"round": r, "train_loss": float(r)})
    assert [(e.step, e.value) for e in read_tensorboard(log_dir).Scalars("train_loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


def test_close_is_idempotent_and_later_calls_log_nothing(tmp_path):
    sinks = open_sinks(True, None, None, tmp_path, "tiny", CONFIG)
    sinks.round(RECORDS[0])
    sinks.close()
    sinks.close()
    sinks.round(RECORDS[1])
    assert [e.step for e in read_tensorboard(tmp_path / "tensorboard").Scalars("train_loss")] == [1]


def absent(monkeypatch, *packages):
    """Makes ``import <package>`` fail as if it were not installed."""
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


def test_nothing_configured_writes_nothing_and_imports_no_sink_library(tmp_path, monkeypatch):
    absent(monkeypatch, "tensorboardX", "wandb", "mlflow")
    run_dir = run_sinks(tmp_path)
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("option, package", [("tensorboard", "tensorboardX"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_library_is_one_line_naming_the_package_and_writes_nothing(tmp_path, monkeypatch, option, package):
    absent(monkeypatch, package)
    settings = {"tensorboard": False, "wandb": None, "mlflow": None} | {option: True if option == "tensorboard" else {}}
    with pytest.raises(ValueError) as error:
        open_sinks(**settings, run_dir=tmp_path, run_name="tiny", config=CONFIG)
    assert str(error.value) == f"log.{option} needs the {package} package: pip install {package}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("settings, message", [
    ({"tensorboard": True}, ("log.tensorboard needs a run directory (--out RUN_DIR): its event files go under "
                             "RUN_DIR/tensorboard")),
    ({"wandb": {"project": "p", "colour": "red"}}, "log.wandb has keys wandb.init does not take: colour"),
    ({"mlflow": {"experiment": "e", "uri": "file:x"}},
     "log.mlflow has unknown keys uri (known: experiment, run_name, tracking_uri)"),
])
def test_bad_sink_options_are_one_line_and_write_nothing(tmp_path, monkeypatch, settings, message):
    monkeypatch.chdir(tmp_path)
    run_dir = None if settings.get("tensorboard") else tmp_path
    with pytest.raises(ValueError) as error:
        open_sinks(**{"tensorboard": False, "wandb": None, "mlflow": None} | settings, run_dir=run_dir,
                   run_name="tiny", config=CONFIG)
    assert str(error.value) == message
    assert list(tmp_path.iterdir()) == []


def wandb_records(path):
    """The protobuf Records of a wandb run file (LevelDB log format: 32 KiB blocks of chunks,
    each with a 7-byte header crc32c, length, type; after a 7-byte ':W&B' file header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_records(path, timeout_s: float = 60.0) -> list:
    """The records of a wandb run file once its ``exit`` record is there: wandb's service process
    writes the file after ``run.finish()`` returns (on a loaded machine, seen not yet written)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_wandb_offline_run_stores_each_round_at_its_step_and_the_summary(tmp_path, monkeypatch):
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = run_sinks(tmp_path, wandb={"project": "sinks-test", "mode": "offline"})
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("tiny-fedit", "sinks-test")
    assert {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"} == CONFIG
    history = [{item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3]
    for logged, record in zip(history, RECORDS):
        assert {k: v for k, v in logged.items() if not k.startswith("_")} == pytest.approx(round_scalars(record))
    summary = {}  # the updates of run.summary, in order ("key" empty: wandb's own nested entries)
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in r.summary.update if item.key})
    final = SUMMARY_NUMBERS | {"devices": "2 x cpu", "stopped": "interrupted after round 3"}
    assert {key: summary[key] for key in final} == pytest.approx(final)
    assert "mean_divergence" not in summary  # NaN is left out
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished on close


def test_mlflow_file_store_holds_params_metrics_per_step_and_summary(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opts out of its file store otherwise
    uri = (tmp_path / "mlruns").as_uri()
    run_sinks(tmp_path, mlflow={"experiment": "sinks-test", "tracking_uri": uri})
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sinks-test").experiment_id])
    assert (run.info.run_name, run.info.status) == ("tiny-fedit", "FINISHED")
    assert run.data.params == flat_params(CONFIG)
    for name in LOGGED:
        stored = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert stored == expected(name), name
    for name, value in SUMMARY_NUMBERS.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] == [(3, value)]
    assert set(run.data.metrics) == LOGGED | set(SUMMARY_NUMBERS)
    assert {k: v for k, v in run.data.tags.items() if k.startswith("summary.")} == {
        "summary.devices": "2 x cpu", "summary.stopped": "interrupted after round 3"}
