"""A comparison's tables: CSV files and the rich tables ``compare`` prints.

Interval cells read ``mean [low, high]``: the mean over seeds and its 95% Student-t interval
clipped to the range the metric can take, so no cell shows an impossible value (an accuracy of
2 seeds is never "0.61 ± 1.41"); one seed gives the mean alone. Cells fold onto more lines in a
narrow terminal rather than losing digits to an ellipsis.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from fedlora_jax.analysis.stats import UNBOUNDED, clip_note, difference_range
from fedlora_jax.eval.metrics import METRIC_RANGES

# Privacy budgets carried over into the summary when the runs log them.
EPSILON_KEYS = ("epsilon", "user_epsilon")


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path:
    """Writes dict rows as CSV with the given column order; None is written as an empty cell."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return path


def format_bytes(n: float) -> str:
    """Bytes with a decimal unit, e.g. 1.50 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def interval_cell(mean: float | None, low: float | None, high: float | None, signed: bool = False) -> str:
    """"0.6113 [0.0000, 1.0000]" (mean and interval), "0.6113" (no interval) or "-" (no value)."""
    spec = "+.4f" if signed else ".4f"
    if mean is None:
        return "-"
    if low is None or high is None:
        return f"{mean:{spec}}"
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def comparison_table(summary: Sequence[dict], headline: str, title: str = "comparison") -> Table:
    """A rich table of the comparison summary: per method, mean [95% CI] over seeds of the final and
    best headline metric and the final local-global gap, bytes, divergence and epsilons."""
    key = f"global_{headline}"
    bounds = METRIC_RANGES.get(headline, UNBOUNDED)
    gap_note = clip_note(difference_range(bounds)).removeprefix(", ")
    caption = (f"mean over the seeds [95% Student-t interval of the mean{clip_note(bounds)}"
               f"{'; gap ' + gap_note if gap_note else ''}]; 1 seed: no interval")
    table = Table(title=title, caption=caption)
    for name, justify in (("method", "left"), ("seeds", "right"), (f"final {headline}", "right"),
                          (f"best {headline}", "right"), ("local-global gap", "right"), ("bytes up", "right"),
                          ("bytes down", "right"), ("divergence", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    eps_keys = [k for k in EPSILON_KEYS if any(f"final_{k}_mean" in row for row in summary)]
    for k in eps_keys:
        table.add_column("ε" if k == "epsilon" else "user ε", justify="right", overflow="fold")

    def cell(row, name, signed=False):
        return interval_cell(row.get(f"{name}_mean"), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"), signed)

    for row in summary:
        eps = [f"{row[f'final_{k}_mean']:.3f}" if row.get(f"final_{k}_mean") is not None else "-" for k in eps_keys]
        table.add_row(row["method"], str(row["seeds"]), cell(row, f"final_{key}"), cell(row, f"best_{key}"),
                      cell(row, "final_local_global_gap", signed=True), format_bytes(row["total_bytes_up"]),
                      format_bytes(row["total_bytes_down"]), f"{row['mean_divergence']:.3g}", *eps)
    return table


def paired_table(paired: Sequence[dict], headline: str) -> Table:
    """A rich table of paired comparisons (``compare.paired_comparisons``): method - reference on
    the same seeds, the headline metric's difference with its 95% CI."""
    bounds = difference_range(METRIC_RANGES.get(headline, UNBOUNDED))
    table = Table(title="paired comparison on the same seeds (method - reference)",
                  caption=f"95% Student-t interval of the mean difference{clip_note(bounds)}")
    for name in ("method", "reference", "metric", "pairs", "difference", "95% CI", "p (paired t)", "wins/losses"):
        table.add_column(name, justify="left" if name in ("method", "reference", "metric") else "right",
                         overflow="fold")
    for row in paired:
        ci = "-" if row["ci_low"] is None else f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
        p = "-" if row["p_value"] is None else f"{row['p_value']:.3g}"
        table.add_row(row["method"], row["reference"], row["metric"], str(row["pairs"]),
                      f"{row['mean_difference']:+.4f}", ci, p, f"{row['wins']}/{row['losses']}")
    return table
