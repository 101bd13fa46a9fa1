"""The ``describe`` command: build only a config's data and report its clients (sizes, label
histograms as a table and a clients x classes heat map)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from fedlora_jax.analysis import plots
from fedlora_jax.config import Config, load_config
from fedlora_jax.data.base import FederatedData
from fedlora_jax.data.partition import label_histogram
from fedlora_jax.run import build_data, build_experiment
from fedlora_jax.run.memory import MemoryPlan, memory_plan
from fedlora_jax.run.plan import memory_available

# Per-class columns shown in the describe table up to this many classes (the heat map has all).
_MAX_TABLE_CLASSES = 12


def _client_label_counts(labels: np.ndarray, sizes: np.ndarray, num_classes: int) -> np.ndarray:
    """Label histogram of clients' rows stored client after client: labels [N], sizes [U] -> counts [U, C]."""
    flat = np.asarray(labels, np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parts = [np.arange(bounds[u], bounds[u + 1]) for u in range(len(sizes))]
    return label_histogram(flat, parts, num_classes)


def data_description(data: FederatedData) -> dict:
    """Client sizes and (for classification) label histograms of federated data, as plain Python.

    Returns:
      A dict with name, task, num_clients, num_labels, label_names, train_sizes [U],
      local_test_sizes [U], global_test_size, total_train, total_local_test, and for
      classification train_label_counts [U][C], local_test_label_counts [U][C] and
      global_test_label_counts [C].
    """
    train_sizes = np.asarray(data.num_train, dtype=np.int64)
    test_sizes = np.asarray(data.num_local_test, dtype=np.int64)
    out: dict[str, Any] = {
        "name": data.name, "task": data.task, "num_clients": data.num_clients, "num_labels": int(data.num_labels),
        "label_names": list(data.label_names) if data.label_names is not None else None,
        "train_sizes": train_sizes.tolist(), "local_test_sizes": test_sizes.tolist(),
        "global_test_size": len(next(iter(data.global_test.values()))),
        "total_train": int(train_sizes.sum()), "total_local_test": int(test_sizes.sum()),
    }
    if data.task == "classification":
        out["train_label_counts"] = _client_label_counts(data.train["labels"], train_sizes, data.num_labels).tolist()
        out["local_test_label_counts"] = _client_label_counts(data.local_test["labels"], test_sizes,
                                                              data.num_labels).tolist()
        global_labels = np.asarray(data.global_test["labels"], dtype=np.int64)
        out["global_test_label_counts"] = np.bincount(global_labels, minlength=data.num_labels).tolist()
    return out


def describe_table(info: dict) -> Table:
    """A rich table of per-client sizes and (classification, up to 12 classes) train label counts."""
    sizes = np.asarray(info["train_sizes"])
    table = Table(title=f"{info['name']} ({info['task']}): {info['num_clients']} clients",
                  caption=f"train sizes: min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()}")
    table.add_column("client", justify="right")
    table.add_column("train", justify="right")
    table.add_column("local test", justify="right")
    counts = info.get("train_label_counts")
    show_classes = counts is not None and info["num_labels"] <= _MAX_TABLE_CLASSES
    if show_classes:
        names = info["label_names"] or [str(c) for c in range(info["num_labels"])]
        for name in names:
            table.add_column(f"train {name}", justify="right")
    for u in range(info["num_clients"]):
        cells = [str(u), str(info["train_sizes"][u]), str(info["local_test_sizes"][u])]
        table.add_row(*cells, *([str(c) for c in counts[u]] if show_classes else []))
    totals = np.asarray(counts).sum(axis=0).tolist() if show_classes else []
    table.add_row("total", str(info["total_train"]), str(info["total_local_test"]), *map(str, totals), style="bold")
    return table


def describe(
    config: str | Path | dict | Config,
    overrides: Sequence[str] | None = None,
    heatmap_path: str | Path | None = None,
    console: Console | None = None,
    show: bool = True,
    plan: bool = False,
) -> dict:
    """Builds only the data of a config and reports its clients.

    Prints a table of per-client train and local-test sizes and (classification) per-class train
    counts, and saves a clients x classes heat map of train label counts to ``heatmap_path``
    (classification only; for regression and causal LM it says there is no heat map).

    Args:
      config: a YAML path, a config dict or a Config.
      overrides: ``key=value`` overrides (ignored when ``config`` is a Config).
      heatmap_path: PNG path for the label heat map, or None for none.
      console: where to print (default: stdout).
      show: print the table and notes.
      plan: also build the experiment and print its memory plan per device (:func:`plan_table`),
        from the compiled round's memory analysis; returned under ``memory_plan``.

    Returns:
      :func:`data_description` of the data, plus ``heatmap``: the PNG path written or None.
    """
    c = config if isinstance(config, Config) else load_config(config, list(overrides or []))
    t0 = time.perf_counter()
    data = build_data(c)
    build_s = time.perf_counter() - t0
    info = data_description(data)
    info["heatmap"] = None
    notes = [f"global test set: {info['global_test_size']} examples; data built in {build_s:.1f}s"]
    if heatmap_path is not None:
        if data.task == "classification":
            info["heatmap"] = plots.plot_label_heatmap(
                np.asarray(info["train_label_counts"]), heatmap_path, class_names=info["label_names"],
                title=f"{data.name}: training examples per client and class")
            notes.append(f"label heat map: {info['heatmap']}")
        else:
            notes.append(f"no label heat map: task {data.task!r} has no class labels (sizes only)")
    tables = [describe_table(info)]
    if plan:
        exp = build_experiment(c, data)
        budget = int(c.federation.memory_fraction * memory_available())
        memory = memory_plan(exp.federation, exp.params, exp.frozen, data, exp.plan.share, budget, c.model.remat)
        info["memory_plan"] = dataclasses.asdict(memory)
        tables.append(plan_table(memory, exp, c))
    if show:
        console = console or Console()
        for table in tables:
            console.print(table)
        if info.get("train_label_counts") is not None and info["num_labels"] > _MAX_TABLE_CLASSES:
            notes.append(f"{info['num_labels']} classes: per-class counts are in the heat map and the returned dict")
        for note in notes:
            console.print(note)
    return info


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f} GiB"


def plan_table(memory: MemoryPlan, exp, config: Config) -> Table:
    """The memory plan of a run per device, as ``describe --plan`` prints it."""
    fed, m = exp.federation, config.model
    table = Table(title=f"memory per device: {fed.devices} {jax.default_backend()} device(s) = "
                        f"{fed.devices // fed.model_devices} client group(s) x {fed.model_devices} model device(s); "
                        f"dtype {m.dtype}, remat {m.remat}, quantize {m.quantize} (from the compiled round)")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    per_token = lambda n: None if n is None else n // max(memory.tokens_per_client, 1)
    rows = [
        ("frozen base (this device's share)", _gib(memory.base)),
        ("fixed: base, state, client rows, outputs, stacked uploads", _gib(memory.fixed)),
        (f"per client in a chunk (remat {m.remat})", _gib(memory.per_client)),
        ("per client, no remat / remat layer", f"{_gib(memory.per_client_plain)} / {_gib(memory.per_client_remat)}"),
        (f"activations per token ({memory.tokens_per_client} tokens per client step), no remat / remat layer",
         f"{per_token(memory.per_client_plain)} B / {per_token(memory.per_client_remat)} B"),
        (f"budget (federation.memory_fraction {config.federation.memory_fraction} of the device)", _gib(memory.budget)),
        (f"largest chunk that fits (of a share of {exp.plan.share} clients)", str(memory.chunk)),
        (f"peak at that chunk / at the run's chunk ({fed.clients_per_chunk or exp.plan.share})",
         f"{_gib(memory.peak(max(memory.chunk, 1)))} / {_gib(memory.peak(fed.clients_per_chunk or exp.plan.share))}"),
    ]
    for row in rows:
        table.add_row(*row)
    return table
