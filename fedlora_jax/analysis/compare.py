"""Benchmark helpers: run one config under several methods and seeds, and describe a config's data.

``run_comparison`` runs every (method, seed) pair into its own run directory and writes the
combined tables and plots::

    OUT/<method>/seed<s>/   a normal run directory (config.yaml, metrics.jsonl, summary.json, ...)
    OUT/results.csv         one row per (method, seed, round), every history field
    OUT/summary.csv         one row per method: final/best headline metric mean, std and 95% CI over seeds, ...
    OUT/paired.csv          each method against the first one on the same seeds: mean difference,
                            its 95% CI, the paired t-test p-value, wins and losses
    OUT/accuracy.png        global headline metric vs round (mean, 95% CI band over seeds)
    OUT/gap.png             local - global headline metric vs round (when local evaluation ran)
    OUT/divergence.png      aggregation divergence vs round (log y)
    OUT/divergence_modules.csv / .png   each LoRA module's divergence (mean over rounds; mean and
                            95% CI over seeds), e.g. to see which layers an aggregation gets wrong
    OUT/bytes.png           cumulative bytes up + down vs round

``describe`` builds only the data of a config and reports client sizes and label histograms.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedlora_jax.analysis import plots
from fedlora_jax.config import Config, load_config
from fedlora_jax.data.base import FederatedData
from fedlora_jax.data.partition import label_histogram
from fedlora_jax.methods import make_method
from fedlora_jax.run import build_data, build_experiment, run
from fedlora_jax.analysis.stats import mean_ci, paired_difference

# Headline metrics in order of preference: classification, regression, causal LM.
HEADLINE_METRICS = ("accuracy", "pearson", "token_accuracy")
# results.csv starts with these columns; the other history fields follow in sorted order.
LEADING_COLUMNS = ("method", "seed", "round", "train_loss", "divergence", "wall_s", "bytes_up", "bytes_down")
# Privacy budgets carried over into the summary when the runs log them.
EPSILON_KEYS = ("epsilon", "user_epsilon")
# Per-class columns shown in the describe table up to this many classes (the heat map has all).
_MAX_TABLE_CLASSES = 12

ConfigSource = str | Path | dict | Config


@dataclasses.dataclass
class ComparisonResult:
    """What ``run_comparison`` produced.

    Attributes:
      rows: one dict per (method, seed, round), keys ``columns`` (None where a round has no value,
        e.g. metrics on rounds without evaluation); the contents of results.csv.
      columns: results.csv column order.
      summary: one dict per method (the contents of summary.csv).
      paired: one dict per (method other than the first, metric): the paired comparison with the
        first method over the seeds (the contents of paired.csv).
      headline: the headline metric name, e.g. "accuracy" (its history key is ``global_<name>``).
      out_dir: the comparison directory.
      run_dirs: (method, seed) -> that run's directory.
      plots: plot name ("accuracy", "gap", "divergence", "divergence_modules", "bytes") -> PNG path.
    """

    rows: list[dict]
    columns: list[str]
    summary: list[dict]
    paired: list[dict]
    headline: str
    out_dir: Path
    run_dirs: dict[tuple[str, int], Path]
    plots: dict[str, Path]


def comparison_configs(config: ConfigSource, methods: Sequence[str], seeds: Sequence[int],
                       overrides: Sequence[str] | None = None) -> dict[tuple[str, int], Config]:
    """Loads and validates the config of every (method, seed) pair, methods included.

    Each config is ``config`` with ``overrides`` applied, then ``federation.method=<method>`` and
    ``seed=<seed>``. Raises ValueError (one line) on the first problem; builds no data or model.
    """
    methods, seeds = list(methods), list(seeds)
    if not methods:
        raise ValueError("compare needs at least one method")
    if not seeds:
        raise ValueError("compare needs at least one seed")
    bad = [s for s in seeds if not isinstance(s, (int, np.integer)) or isinstance(s, bool)]
    if bad:
        raise ValueError(f"seeds must be integers, got {bad}")
    for name, items in (("methods", methods), ("seeds", seeds)):
        repeated = sorted({str(x) for x in items if items.count(x) > 1})
        if repeated:
            raise ValueError(f"{name} listed more than once: {', '.join(repeated)}")
    base = config.to_dict() if isinstance(config, Config) else config
    configs = {}
    for method in methods:
        for seed in seeds:
            c = load_config(base, [*(overrides or []), f"federation.method={method}", f"seed={int(seed)}"])
            make_method(c.federation.method, c.federation.method_options, lora_rank=c.lora.rank)
            configs[(method, int(seed))] = c
    return configs


def run_comparison(config: ConfigSource, methods: Sequence[str], seeds: Sequence[int],
                   overrides: Sequence[str] | None, out_dir: str | Path, progress: bool = True,
                   console: Console | None = None) -> ComparisonResult:
    """Runs ``config`` once per (method, seed) and writes the comparison tables and plots.

    Every (method, seed) config is validated and the first seed's data is built before anything
    is written; ``out_dir`` must not exist or be empty. Data are built once per seed and shared
    by the methods. Runs go seed by seed, each quiet, under one progress bar over all runs.

    Args:
      config: a YAML path, a config dict or a Config.
      methods: method registry names (``federation.method``), e.g. ["fedit", "ffa"].
      seeds: integer seeds (``seed``).
      overrides: ``key=value`` overrides applied to every run (before method and seed).
      out_dir: comparison directory (created).
      progress: show the progress bar and print the summary table.
      console: where to draw them (default: stderr).

    Returns:
      The rows, summary, run directories and plot paths (see :class:`ComparisonResult`).
    """
    configs = comparison_configs(config, methods, seeds, overrides)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"comparison directory {out_dir} already exists and is not empty")
    methods, seeds = list(methods), [int(s) for s in seeds]
    console = console or Console(stderr=True)
    prebuilt = {seeds[0]: build_data(configs[(methods[0], seeds[0])])}

    histories: dict[tuple[str, int], list[dict]] = {}
    run_dirs: dict[tuple[str, int], Path] = {}
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task(f"compare {configs[(methods[0], seeds[0])].name}", total=len(configs), status="")
        for seed in seeds:
            seed_data = prebuilt.pop(seed) if seed in prebuilt else build_data(configs[(methods[0], seed)])
            for method in methods:
                bar.update(task, status=f"running {method} seed {seed}")
                config_ms = configs[(method, seed)]
                run_dir = out_dir / method / f"seed{seed}"
                result = run(config_ms, run_dir, progress=False, console=console,
                             experiment=build_experiment(config_ms, data=seed_data))
                histories[(method, seed)] = result.history
                run_dirs[(method, seed)] = run_dir
                bar.update(task, advance=1, status=f"{method} seed {seed}: {_run_status(result.history)}")

    rows, row_columns = comparison_rows(histories)
    headline = headline_metric(rows)
    summary = summarise_comparison(histories, methods, headline)
    paired = paired_comparisons(histories, methods, headline)
    modules, per_module = module_divergence(histories, methods, seeds)
    write_csv(rows, row_columns, out_dir / "results.csv")
    write_csv(summary, list(summary[0]), out_dir / "summary.csv")
    if paired:
        write_csv(paired, list(paired[0]), out_dir / "paired.csv")
    if modules:
        write_csv(module_divergence_rows(modules, per_module), MODULE_COLUMNS, out_dir / "divergence_modules.csv")
    figures = plot_comparison(histories, methods, headline, out_dir)
    if modules:
        figures["divergence_modules"] = plots.plot_module_divergence(modules, per_module,
                                                                     out_dir / "divergence_modules.png")
    if progress:
        console.print(comparison_table(summary, headline, title=f"{configs[(methods[0], seeds[0])].name}: "
                                                                f"{len(methods)} methods x {len(seeds)} seeds"))
        if paired:
            console.print(paired_table(paired))
    return ComparisonResult(rows, row_columns, summary, paired, headline, out_dir, run_dirs, figures)


MODULE_COLUMNS = ("method", "module", "divergence_mean", "divergence_ci95", "seeds")


def module_divergence(histories: dict[tuple[str, int], list[dict]], methods: Sequence[str],
                      seeds: Sequence[int]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Each LoRA module's divergence averaged over a run's rounds, from the rounds' records (their
    ``"modules"``, as the runs' divergence.jsonl logs them).

    Returns:
      (modules [M] in layout order, method -> values [S, M], one row per seed); methods whose runs
      logged no round are left out, and modules is empty when no run did (or there is no LoRA module).
    """
    modules: list[str] = []
    values = {}
    for method in methods:
        per_seed = []
        for seed in seeds:
            records = [record["modules"] for record in histories[(method, seed)]]
            if not records:
                continue
            modules = list(records[0])
            per_seed.append([np.mean([r[m] for r in records]) for m in modules])
        if per_seed and modules:
            values[method] = np.asarray(per_seed, dtype=np.float64)
    return modules, values


def module_divergence_rows(modules: Sequence[str], values: dict[str, np.ndarray]) -> list[dict]:
    """Rows of divergence_modules.csv: per (method, module) the mean over seeds of the run-averaged
    divergence and its 95% CI half-width (empty with one seed)."""
    rows = []
    for method, per_seed in values.items():
        for j, module in enumerate(modules):
            mean, half = mean_ci(per_seed[:, j])
            rows.append({"method": method, "module": module, "divergence_mean": mean, "divergence_ci95": half,
                         "seeds": per_seed.shape[0]})
    return rows


def _run_status(history: list[dict]) -> str:
    last = history[-1]
    for metric in HEADLINE_METRICS:
        if f"global_{metric}" in last:
            return f"{metric} {last[f'global_{metric}']:.4f}"
    return f"loss {last['train_loss']:.4f}"


def comparison_rows(histories: dict[tuple[str, int], list[dict]]) -> tuple[list[dict], list[str]]:
    """Flattens run histories into rows with a stable column order.

    Args:
      histories: (method, seed) -> the run's per-round records, in the order rows should follow.

    Returns:
      (rows, columns): one dict per (method, seed, round) with every column (None where the
      record lacks it); columns are LEADING_COLUMNS then the other keys sorted.
    """
    keys = {k for history in histories.values() for record in history for k in record}
    columns = [c for c in LEADING_COLUMNS if c in keys or c in ("method", "seed")]
    columns += sorted(keys - set(columns))
    rows = []
    for (method, seed), history in histories.items():
        for record in history:
            row = {"method": method, "seed": seed, **record}
            rows.append({c: row.get(c) for c in columns})
    return rows, columns


def headline_metric(rows: Sequence[dict]) -> str:
    """The first of accuracy, pearson, token_accuracy with a ``global_`` value in the rows."""
    for metric in HEADLINE_METRICS:
        if any(row.get(f"global_{metric}") is not None for row in rows):
            return metric
    raise ValueError(f"no run evaluated any of {', '.join('global_' + m for m in HEADLINE_METRICS)}")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def summarise_comparison(histories: dict[tuple[str, int], list[dict]], methods: Sequence[str],
                         headline: str) -> list[dict]:
    """One summary dict per method, statistics over its seeds.

    "final" is a run's last evaluated round, "best" its maximum over evaluated rounds; ``_mean``,
    ``_std`` and ``_ci95`` are the mean, the sample standard deviation and the half-width of the
    95% Student-t confidence interval of the mean over seeds (None with one seed). Bytes are
    per-run totals and divergence the per-run mean over rounds, both averaged over seeds. Gap and epsilon keys are
    present (None where a method lacks them) when any run logged them.
    """
    key = f"global_{headline}"
    logged = {k for history in histories.values() for record in history for k in record}
    summary = []
    for method in methods:
        runs = [history for (m, _), history in histories.items() if m == method]
        evaluated = [[r for r in history if key in r] for history in runs]
        if any(not e for e in evaluated):
            raise ValueError(f"method {method!r}: a run has no round with {key}")
        row: dict[str, Any] = {"method": method, "seeds": len(runs), "rounds": max(len(h) for h in runs)}
        for name, values in _headline_values(evaluated, key).items():
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(values)
            row[f"{name}_ci95"] = mean_ci(values)[1]
        if "local_global_gap" in logged:
            gaps = [e[-1]["local_global_gap"] for e in evaluated if "local_global_gap" in e[-1]]
            row["final_local_global_gap_mean"], row["final_local_global_gap_std"] = _mean_std(gaps) if gaps else (None, None)
            row["final_local_global_gap_ci95"] = mean_ci(gaps)[1] if gaps else None
        row["final_train_loss_mean"] = _mean_std([h[-1]["train_loss"] for h in runs])[0]
        row["total_bytes_up"] = int(np.mean([sum(r["bytes_up"] for r in h) for h in runs]))
        row["total_bytes_down"] = int(np.mean([sum(r["bytes_down"] for r in h) for h in runs]))
        row["mean_divergence"] = float(np.mean([np.mean([r["divergence"] for r in h]) for h in runs]))
        for eps in EPSILON_KEYS:
            if eps in logged:
                finals = [[r[eps] for r in h if eps in r][-1] for h in runs if any(eps in r for r in h)]
                row[f"final_{eps}_mean"] = float(np.mean(finals)) if finals else None
        row["train_s_mean"] = float(np.mean([sum(r["wall_s"] for r in h) for h in runs]))
        summary.append(row)
    return summary


def _headline_values(evaluated: list[list[dict]], key: str) -> dict[str, list[float]]:
    """Per run (in seed order): the final and the best value of ``key`` over its evaluated rounds."""
    return {f"final_{key}": [e[-1][key] for e in evaluated], f"best_{key}": [max(r[key] for r in e) for e in evaluated]}


def paired_comparisons(histories: dict[tuple[str, int], list[dict]], methods: Sequence[str],
                       headline: str) -> list[dict]:
    """Each method after the first against the first, seed by seed (the same seed gives both the
    same data split and initialisation), on the final and the best headline metric:
    :func:`fedlora_jax.analysis.stats.paired_difference` of (method - reference). Empty for one method."""
    key = f"global_{headline}"
    seeds = sorted({s for (_, s) in histories})
    values = {m: _headline_values([[r for r in histories[(m, s)] if key in r] for s in seeds], key) for m in methods}
    rows = []
    for method in methods[1:]:
        for metric in values[method]:
            rows.append({"method": method, "reference": methods[0], "metric": metric,
                         **paired_difference(values[method][metric], values[methods[0]][metric])})
    return rows


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path:
    """Writes dict rows as CSV with the given column order; None is written as an empty cell."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return path


def method_curves(histories: dict[tuple[str, int], list[dict]], method: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A history field of one method's runs on a common round axis.

    Returns:
      (rounds [R], values [S, R]): the rounds where any seed logged ``key``; NaN where a seed did not.
    """
    runs = [{r["round"]: r[key] for r in history if r.get(key) is not None}
            for (m, _), history in histories.items() if m == method]
    rounds = np.array(sorted({r for run_values in runs for r in run_values}), dtype=np.int64)
    values = np.array([[run_values.get(int(r), np.nan) for r in rounds] for run_values in runs], dtype=np.float64)
    return rounds, values.reshape(len(runs), len(rounds))


def plot_comparison(histories: dict[tuple[str, int], list[dict]], methods: Sequence[str], headline: str,
                    out_dir: Path) -> dict[str, Path]:
    """Writes accuracy.png, gap.png (when local evaluation ran), divergence.png and bytes.png."""
    def curves(key):
        out = {m: method_curves(histories, m, key) for m in methods}
        return {m: c for m, c in out.items() if c[0].size}

    written = {"accuracy": plots.plot_seed_bands(curves(f"global_{headline}"), out_dir / "accuracy.png",
                                                 ylabel=f"global {headline}", title=f"Global test {headline}")}
    gap = curves("local_global_gap")
    if gap:
        written["gap"] = plots.plot_seed_bands(gap, out_dir / "gap.png", ylabel=f"local - global {headline}",
                                               title=f"Personalisation gap (local - global {headline})")
    written["divergence"] = plots.plot_seed_bands(curves("divergence"), out_dir / "divergence.png",
                                                  ylabel="divergence (mean over LoRA modules)",
                                                  title="Aggregation divergence", log_y=True)
    traffic = {}
    for m in methods:
        rounds, up = method_curves(histories, m, "bytes_up")
        _, down = method_curves(histories, m, "bytes_down")
        traffic[m] = (rounds, np.nanmean(up + down, axis=0))
    written["bytes"] = plots.plot_cumulative_bytes(traffic, out_dir / "bytes.png",
                                                   title="Communication (mean over seeds)")
    return written


def format_bytes(n: float) -> str:
    """Bytes with a decimal unit, e.g. 1.50 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def comparison_table(summary: Sequence[dict], headline: str, title: str = "comparison") -> Table:
    """A rich table of the comparison summary (mean ± 95% CI half-width over seeds)."""
    key = f"global_{headline}"
    table = Table(title=title, caption="mean ± 95% confidence interval over seeds (Student t)")
    for name, justify in (("method", "left"), ("seeds", "right"), (f"final {headline}", "right"),
                          (f"best {headline}", "right"), ("local-global gap", "right"), ("bytes up", "right"),
                          ("bytes down", "right"), ("divergence", "right")):
        table.add_column(name, justify=justify)
    eps_keys = [k for k in EPSILON_KEYS if any(f"final_{k}_mean" in row for row in summary)]
    for k in eps_keys:
        table.add_column("ε" if k == "epsilon" else "user ε", justify="right")

    def pm(row, name):
        mean, half = row.get(f"{name}_mean"), row.get(f"{name}_ci95")
        return "-" if mean is None else f"{mean:.4f}" if half is None else f"{mean:.4f} ± {half:.4f}"

    for row in summary:
        eps = [f"{row[f'final_{k}_mean']:.3f}" if row.get(f"final_{k}_mean") is not None else "-" for k in eps_keys]
        table.add_row(row["method"], str(row["seeds"]), pm(row, f"final_{key}"), pm(row, f"best_{key}"),
                      pm(row, "final_local_global_gap"), format_bytes(row["total_bytes_up"]),
                      format_bytes(row["total_bytes_down"]), f"{row['mean_divergence']:.3g}", *eps)
    return table


def paired_table(paired: Sequence[dict]) -> Table:
    """A rich table of :func:`paired_comparisons`: method - reference on the same seeds."""
    table = Table(title="paired comparison on the same seeds (method - reference)")
    for name in ("method", "reference", "metric", "pairs", "difference", "95% CI", "p (paired t)", "wins/losses"):
        table.add_column(name, justify="left" if name in ("method", "reference", "metric") else "right")
    for row in paired:
        ci = "-" if row["ci_low"] is None else f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
        p = "-" if row["p_value"] is None else f"{row['p_value']:.3g}"
        table.add_row(row["method"], row["reference"], row["metric"], str(row["pairs"]),
                      f"{row['mean_difference']:+.4f}", ci, p, f"{row['wins']}/{row['losses']}")
    return table


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
        "global_test_size": int(len(next(iter(data.global_test.values())))),
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


def describe(config: ConfigSource, overrides: Sequence[str] | None = None, heatmap_path: str | Path | None = None,
             console: Console | None = None, show: bool = True) -> dict:
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
    if show:
        console = console or Console()
        console.print(describe_table(info))
        if info.get("train_label_counts") is not None and info["num_labels"] > _MAX_TABLE_CLASSES:
            notes.append(f"{info['num_labels']} classes: per-class counts are in the heat map and the returned dict")
        for note in notes:
            console.print(note)
    return info
