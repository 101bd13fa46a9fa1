"""The ``compare`` command: run one config under several methods and seeds, and gather the runs'
histories into tables, statistics over seeds and plots.

``run_comparison`` runs every (method, seed) pair into its own run directory and writes the
combined tables and plots::

    OUT/<method>/seed<s>/   a normal run directory (config.yaml, metrics.jsonl, summary.json, ...)
    OUT/results.csv         one row per (method, seed, round), every history field
    OUT/summary.csv         one row per method: final/best headline metric mean, std, 95% CI half-width
                            and the CI's bounds clipped to the metric's range, over seeds, ...
    OUT/paired.csv          each method against the first one on the same seeds: mean difference,
                            its 95% CI, the paired t-test p-value, wins and losses
    OUT/accuracy.png        global headline metric vs round (mean, 95% CI band over seeds, clipped)
    OUT/gap.png             local - global headline metric vs round (when local evaluation ran)
    OUT/divergence.png      aggregation divergence vs round (log y)
    OUT/divergence_modules.csv / .png   each LoRA module's divergence (mean over rounds; mean and
                            95% CI over seeds), e.g. to see which layers an aggregation gets wrong
    OUT/bytes.png           cumulative bytes up + down vs round

Every interval is a 95% Student-t interval of the mean over seeds, clipped to the range its
quantity can take (:func:`field_range`); with one seed there is none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedlora_jax.analysis import plots
from fedlora_jax.analysis.stats import UNBOUNDED, difference_range, mean_ci, mean_interval, paired_difference
from fedlora_jax.analysis.tables import EPSILON_KEYS, comparison_table, paired_table, write_csv
from fedlora_jax.config import Config, load_config
from fedlora_jax.eval.metrics import METRIC_RANGES
from fedlora_jax.methods import make_method
from fedlora_jax.run import build_data, build_experiment, run
from fedlora_jax.tasks import TASK_KINDS

# Headline metrics in order of preference: classification, regression, causal LM (each task kind's).
HEADLINE_METRICS = tuple(kind.headline for kind in TASK_KINDS.values())
# results.csv starts with these columns; the other history fields follow in sorted order.
LEADING_COLUMNS = ("method", "seed", "round", "train_loss", "divergence", "wall_s", "bytes_up", "bytes_down")
# summary.csv's statistics over seeds of each headline value (columns <value>_<statistic>).
_STATISTICS = ("mean", "std", "ci95", "ci_low", "ci_high")
# History fields that are never negative (divergence is a norm; bytes and time are counts).
_NON_NEGATIVE_FIELDS = ("train_loss", "divergence", "bytes_up", "bytes_down", "wall_s")

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
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
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
            console.print(paired_table(paired, headline))
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


def field_range(key: str, headline: str) -> tuple[float, float]:
    """The values a history field can take, which its intervals are clipped to: an evaluated
    metric's range (``global_``/``local_`` prefix dropped; accuracy [0, 1], Pearson [-1, 1],
    loss >= 0), the local-global gap's (the headline's range minus itself), >= 0 for the train
    loss, divergence, bytes and time; unbounded for a field it does not know."""
    if key == "local_global_gap":
        return difference_range(METRIC_RANGES.get(headline, UNBOUNDED))
    if key in _NON_NEGATIVE_FIELDS:
        return 0.0, np.inf
    return METRIC_RANGES.get(key.removeprefix("global_").removeprefix("local_"), UNBOUNDED)


def _statistics(name: str, values: Sequence[float], bounds: tuple[float, float]) -> dict[str, float | None]:
    """``<name>_<statistic>`` for each of _STATISTICS over values [S]: mean, sample std (ddof=1; 0.0
    for one value), 95% CI half-width and the CI's bounds clipped to ``bounds`` (the last three
    None for one value)."""
    x = np.asarray(values, dtype=np.float64)
    mean, low, high = mean_interval(x, bounds)
    statistics = (mean, float(x.std(ddof=1)) if x.size > 1 else 0.0, mean_ci(x)[1], low, high)
    return {f"{name}_{s}": value for s, value in zip(_STATISTICS, statistics)}


def summarise_comparison(histories: dict[tuple[str, int], list[dict]], methods: Sequence[str],
                         headline: str) -> list[dict]:
    """One summary dict per method, statistics over its seeds.

    "final" is a run's last evaluated round, "best" its maximum over evaluated rounds; ``_mean``,
    ``_std`` and ``_ci95`` are the mean, the sample standard deviation and the half-width of the
    95% Student-t confidence interval of the mean over seeds, ``_ci_low`` and ``_ci_high`` that
    interval's bounds clipped to the metric's range (:func:`field_range`; the last three None
    with one seed). Bytes are
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
            row.update(_statistics(name, values, field_range(key, headline)))
        if "local_global_gap" in logged:
            gaps = [e[-1]["local_global_gap"] for e in evaluated if "local_global_gap" in e[-1]]
            row.update(_statistics("final_local_global_gap", gaps, field_range("local_global_gap", headline)) if gaps
                       else {f"final_local_global_gap_{s}": None for s in _STATISTICS})
        row["final_train_loss_mean"] = float(np.mean([h[-1]["train_loss"] for h in runs]))
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
    :func:`fedlora_jax.analysis.stats.paired_difference` of (method - reference), its interval
    clipped to the range of a difference of the headline metric. Empty for one method."""
    key = f"global_{headline}"
    bounds = difference_range(field_range(key, headline))
    seeds = sorted({s for (_, s) in histories})
    values = {m: _headline_values([[r for r in histories[(m, s)] if key in r] for s in seeds], key) for m in methods}
    rows = []
    for method in methods[1:]:
        for metric in values[method]:
            rows.append({"method": method, "reference": methods[0], "metric": metric,
                         **paired_difference(values[method][metric], values[methods[0]][metric], bounds=bounds)})
    return rows


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
    """Writes accuracy.png, gap.png (when local evaluation ran), divergence.png and bytes.png; each
    band is clipped to its field's range (:func:`field_range`)."""
    def curves(key):
        out = {m: method_curves(histories, m, key) for m in methods}
        return {m: c for m, c in out.items() if c[0].size}

    key = f"global_{headline}"
    written = {"accuracy": plots.plot_seed_bands(curves(key), out_dir / "accuracy.png", ylabel=f"global {headline}",
                                                 title=f"Global test {headline}", bounds=field_range(key, headline))}
    gap = curves("local_global_gap")
    if gap:
        written["gap"] = plots.plot_seed_bands(gap, out_dir / "gap.png", ylabel=f"local - global {headline}",
                                               title=f"Personalisation gap (local - global {headline})",
                                               bounds=field_range("local_global_gap", headline))
    written["divergence"] = plots.plot_seed_bands(curves("divergence"), out_dir / "divergence.png",
                                                  ylabel="divergence (mean over LoRA modules)",
                                                  title="Aggregation divergence", log_y=True,
                                                  bounds=field_range("divergence", headline))
    traffic = {}
    for m in methods:
        rounds, up = method_curves(histories, m, "bytes_up")
        _, down = method_curves(histories, m, "bytes_down")
        traffic[m] = (rounds, np.nanmean(up + down, axis=0))
    written["bytes"] = plots.plot_cumulative_bytes(traffic, out_dir / "bytes.png",
                                                   title="Communication (mean over seeds)")
    return written
