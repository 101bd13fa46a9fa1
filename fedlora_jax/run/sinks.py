"""Logging sinks: a run's round records and summary streamed to TensorBoard, Weights & Biases or
MLflow through those libraries, beside the run directory (metrics.jsonl, summary.json), which stays
the record. Each library is imported only when its sink is configured."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import numbers
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Self

# the package each sink needs, by its config key under ``log:``
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}
MLFLOW_KEYS = ("experiment", "run_name", "tracking_uri")
MLFLOW_PARAM_LENGTH = 500  # the value limit of older MLflow servers (newer ones allow 6000)
MLFLOW_BATCH = 100  # MLflow's per-request limit on params and tags (1000 on metrics)


def scalars(record: Mapping, prefix: str = "") -> dict[str, float]:
    """Every finite number of ``record`` by name (bools as 0/1), nested mappings as
    ``"<key>/<name>"``; strings, None, lists and non-finite numbers are left out."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, numbers.Real) and math.isfinite(value):  # bool is a Real
            out[name] = float(value)
    return out


def texts(summary: Mapping) -> dict[str, str]:
    """The string values of a summary (why the run stopped, the devices it ran on)."""
    return {key: value for key, value in summary.items() if isinstance(value, str)}


def flat_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, JSON values (strings as they are) cut to
    ``MLFLOW_PARAM_LENGTH`` characters (ending in ``...`` when cut)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[name] = text if len(text) <= MLFLOW_PARAM_LENGTH else text[:MLFLOW_PARAM_LENGTH - 3] + "..."
    return out


def _package(option: str) -> ModuleType:
    """The package ``log.<option>`` needs, imported; ValueError naming it when it is not installed."""
    name = PACKAGES[option]
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"log.{option} needs the {name} package: pip install {name}") from None


def check_sinks(tensorboard: bool, wandb: Mapping | None, mlflow: Mapping | None, run_dir: Path | None) -> None:
    """Raises ValueError (one line) when a configured sink cannot open: its package is missing,
    TensorBoard has no run directory to write under, or a mapping has a key its library does not
    take. Imports only the configured sinks' packages; writes nothing."""
    if tensorboard:
        if run_dir is None:
            raise ValueError("log.tensorboard needs a run directory (--out RUN_DIR): its event files go under "
                             "RUN_DIR/tensorboard")
        _package("tensorboard")
    if wandb is not None:
        known = inspect.signature(_package("wandb").init).parameters
        unknown = sorted(set(wandb) - set(known))
        if unknown:
            raise ValueError(f"log.wandb has keys wandb.init does not take: {', '.join(unknown)}")
    if mlflow is not None:
        unknown = sorted(set(mlflow) - set(MLFLOW_KEYS))
        if unknown:
            raise ValueError(f"log.mlflow has unknown keys {', '.join(unknown)} (known: {', '.join(MLFLOW_KEYS)})")
        _package("mlflow")


def open_sinks(tensorboard: bool, wandb: Mapping | None, mlflow: Mapping | None, run_dir: Path | None,
               run_name: str, config: dict) -> Sinks:
    """The configured sinks, opened after ``check_sinks`` passes (so bad input creates nothing).

    Args:
      tensorboard: write event files under ``run_dir/tensorboard`` (needs tensorboardX).
      wandb: None, or keyword arguments for ``wandb.init`` (e.g. ``{project: x, mode: offline}``);
        they override the defaults name=run_name, config=config, dir=run_dir.
      mlflow: None, or ``{experiment, tracking_uri, run_name}`` (all optional; experiment
        "Default", MLflow's own tracking URI resolution, run_name=run_name).
      run_dir: the run directory, or None for a run without one.
      run_name: the run's display name.
      config: the resolved config (nested dict), stored with the run by wandb and MLflow.
    """
    check_sinks(tensorboard, wandb, mlflow, run_dir)
    with contextlib.ExitStack() as opened:  # a sink that fails to open closes those opened before it
        sinks = []
        if tensorboard:
            sinks.append(opened.enter_context(_TensorBoard(Path(run_dir) / "tensorboard")))
        if wandb is not None:
            sinks.append(opened.enter_context(_Wandb(wandb, run_dir, run_name, config)))
        if mlflow is not None:
            sinks.append(opened.enter_context(_Mlflow(mlflow, run_name, config)))
        return Sinks(sinks, opened.pop_all())


class Sinks:
    """The opened sinks of one run. ``round(record)`` after each round, ``summary(summary)`` at the
    end, ``close()`` (or leave the ``with`` block) to flush and finish; closing twice is harmless.
    With no sink configured every call does nothing."""

    def __init__(self, sinks: list, closing: contextlib.ExitStack):
        self._sinks = sinks
        self._closing = closing  # closes the sinks, in reverse order of opening
        self._step = 0  # the last round logged: the step the summary is logged at

    def round(self, record: Mapping) -> None:
        """Logs ``scalars(record)`` (all but ``"round"``) at step ``record["round"]``."""
        step = int(record["round"])
        values = scalars({key: value for key, value in record.items() if key != "round"})
        for sink in self._sinks:
            sink.log(values, step)
        self._step = step

    def summary(self, summary: Mapping) -> None:
        """Logs the final numbers (and the strings, as text) at the last round logged."""
        for sink in self._sinks:
            sink.summary(scalars(summary), texts(summary), self._step)

    def close(self) -> None:
        """Flushes and finishes every sink (TensorBoard writer, wandb run, MLflow run)."""
        self._sinks = []
        self._closing.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorBoard:
    """Scalars under their names; the summary's numbers under ``summary/<name>`` and its strings
    as text, at the last step."""

    def __init__(self, log_dir: Path):
        from tensorboardX import SummaryWriter

        # event files are named by the second they open in; the suffix keeps a resumed run's
        # writer from overwriting one opened in the same second
        self.writer = SummaryWriter(str(log_dir), filename_suffix=f".{time.time_ns()}")

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def summary(self, values: dict[str, float], strings: dict[str, str], step: int) -> None:
        self.log({f"summary/{name}": value for name, value in values.items()}, step)
        for name, text in strings.items():
            self.writer.add_text(f"summary/{name}", text, step)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


class _Wandb:
    """One wandb run: ``run.log`` each round, ``run.summary`` at the end, ``run.finish`` on close."""

    def __init__(self, options: Mapping, run_dir: Path | None, run_name: str, config: dict):
        import wandb

        defaults = {"name": run_name, "config": config, "dir": None if run_dir is None else str(run_dir)}
        self.run = wandb.init(**{**defaults, **options})

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float], strings: dict[str, str], step: int) -> None:
        self.run.summary.update({**values, **strings})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.run.finish()


class _Mlflow:
    """One MLflow run through an ``MlflowClient`` (no process-wide tracking URI or active run):
    the flattened config as params, metrics per round, the summary's numbers as metrics at the
    last step and its strings as ``summary.<name>`` tags; the run is ended on close."""

    def __init__(self, options: Mapping, run_name: str, config: dict):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=options.get("tracking_uri"))
        self.entities = mlflow.entities
        name = options.get("experiment", "Default")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=options.get("run_name", run_name)).info.run_id
        self.send("params", [self.entities.Param(key, value) for key, value in flat_params(config).items()])

    def send(self, kind: str, entities: list) -> None:
        """``log_batch`` of params, tags or metrics, in requests of at most MLflow's limit."""
        size = 10 * MLFLOW_BATCH if kind == "metrics" else MLFLOW_BATCH
        for start in range(0, len(entities), size):
            self.client.log_batch(self.run_id, **{kind: entities[start:start + size]})

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.send("metrics", [self.entities.Metric(name, value, now, step) for name, value in values.items()])

    def summary(self, values: dict[str, float], strings: dict[str, str], step: int) -> None:
        self.log(values, step)
        self.send("tags", [self.entities.RunTag(f"summary.{name}", text) for name, text in strings.items()])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.client.set_terminated(self.run_id)
