"""Figures for run reports, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlora_jax.stats import ci_band

# Cells are annotated with their counts only up to this many cells (beyond, text is unreadable).
_MAX_ANNOTATED_CELLS = 400


def plot_label_heatmap(
    counts: Any,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    title: str = "Examples per client and class",
) -> Path:
    """Draws a clients x classes heat map of example counts and saves it as a PNG.

    Clients run along the x axis and classes along the y axis; cells are annotated with their
    counts when there are at most 400 cells.

    Args:
      counts: [U, C] example counts (e.g. ``partition.label_histogram``).
      path: output PNG file (parent folders are created).
      class_names: C class names for the y axis; None uses the class ids.
      title: figure title.

    Returns:
      The path written.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or 0 in counts.shape:
        raise ValueError(f"counts must be a non-empty [U, C] array, got shape {counts.shape}")
    num_clients, num_classes = counts.shape
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    figure = Figure(
        figsize=(min(max(0.6 * num_clients + 2.5, 5.0), 20.0),
                 min(max(0.5 * num_classes + 1.8, 2.8), 12.0)),
        dpi=120,
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(counts.T, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="examples")
    axes.set_xlabel("client")
    axes.set_ylabel("class")
    axes.set_title(title)
    axes.set_yticks(range(num_classes), labels=class_names or [str(c) for c in range(num_classes)])
    step = max(1, num_clients // 25)
    axes.set_xticks(range(0, num_clients, step))
    if counts.size <= _MAX_ANNOTATED_CELLS:
        threshold = (counts.max() + counts.min()) / 2
        font_size = 9 if num_clients <= 10 else 7
        for u in range(num_clients):
            for c in range(num_classes):
                axes.text(u, c, f"{counts[u, c]:g}", ha="center", va="center", fontsize=font_size,
                          color="black" if counts[u, c] > threshold else "white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


# Line styles and markers cycle alongside the colours, so methods whose curves coincide stay visible.
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _curve_figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=(7.0, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def _line_style(index: int, num_points: int) -> dict:
    """Colour, dash pattern and marker of the index-th curve (markers only on short curves)."""
    return {"color": f"C{index % 10}", "linestyle": _LINE_STYLES[index % len(_LINE_STYLES)],
            "marker": _MARKERS[index % len(_MARKERS)] if num_points <= 30 else None, "markersize": 4}


def _legend(axes: Any, title: str | None = None) -> None:
    axes.legend(title=title, fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_seed_bands(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    ylabel: str,
    title: str,
    log_y: bool = False,
    xlabel: str = "round",
) -> Path:
    """Draws one line per method (the mean over seeds) with a shaded band: the 95% Student-t
    confidence interval of the mean over seeds (:func:`fedlora_jax.stats.ci_band`).

    Args:
      curves: method name -> (rounds [R], values [S, R]); NaN marks a round a seed did not reach
        or did not evaluate, and is left out of that round's mean and band.
      path: output PNG file (parent folders are created).
      ylabel: y axis label.
      title: figure title.
      log_y: logarithmic y axis; when some value is <= 0 (e.g. an exact aggregation with zero
        divergence) a symmetric log axis, linear below the smallest positive value, is used.
      xlabel: x axis label.

    Returns:
      The path written.
    """
    if not curves:
        raise ValueError("plot_seed_bands needs at least one curve")
    figure, axes = _curve_figure(title, xlabel, ylabel)
    finite = []
    for index, (name, (rounds, values)) in enumerate(curves.items()):
        rounds = np.asarray(rounds, dtype=np.float64)
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        if values.shape[1] != rounds.shape[0]:
            raise ValueError(f"curve {name!r}: {rounds.shape[0]} rounds but values of shape {values.shape}")
        seen = ~np.all(np.isnan(values), axis=0)
        rounds, values = rounds[seen], values[:, seen]
        mean, low, high = ci_band(values)
        style = _line_style(index, len(rounds))
        axes.plot(rounds, mean, label=f"{name} (n={values.shape[0]})", **style)
        if values.shape[0] > 1:
            axes.fill_between(rounds, low, high, color=style["color"], alpha=0.15, linewidth=0)
        finite.append(values[np.isfinite(values)])
    if log_y:
        everything = np.concatenate(finite)
        positive = everything[everything > 0]
        if positive.size == everything.size and positive.size:
            axes.set_yscale("log")
        else:
            axes.set_yscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)
    _legend(axes, "mean; band: 95% CI over seeds")
    return _save(figure, path)


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if largest >= size:
            return unit, size
    return "B", 1.0


def plot_cumulative_bytes(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    title: str = "Communication",
    xlabel: str = "round",
) -> Path:
    """Draws cumulative communicated bytes against rounds, one line per method.

    Args:
      curves: method name -> (rounds [R], bytes [R]) bytes communicated in each round (e.g.
        upload + download, averaged over seeds); the plot accumulates them.
      path: output PNG file (parent folders are created).
      title: figure title.
      xlabel: x axis label.

    Returns:
      The path written.
    """
    if not curves:
        raise ValueError("plot_cumulative_bytes needs at least one curve")
    totals = {name: (np.asarray(r, dtype=np.float64), np.cumsum(np.asarray(b, dtype=np.float64)))
              for name, (r, b) in curves.items()}
    unit, size = _byte_unit(max(float(c[-1]) if c.size else 0.0 for _, c in totals.values()))
    figure, axes = _curve_figure(title, xlabel, f"cumulative bytes up + down ({unit})")
    for index, (name, (rounds, cumulative)) in enumerate(totals.items()):
        if rounds.shape != cumulative.shape:
            raise ValueError(f"curve {name!r}: {rounds.shape[0]} rounds but {cumulative.shape[0]} byte counts")
        axes.plot(rounds, cumulative / size, label=name, **_line_style(index, len(rounds)))
    _legend(axes)
    return _save(figure, path)
