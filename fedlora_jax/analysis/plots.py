"""Figures for run reports, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlora_jax.analysis.stats import UNBOUNDED, ci_band, clip_note

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


def band_legend_title(seeds: Sequence[int], bounds: tuple[float, float] = UNBOUNDED, mark: str = "band") -> str:
    """How the means and their intervals (drawn as a ``mark``) are computed, for a legend title:
    e.g. "mean over 2 seeds; band: 95% t-interval, clipped to [0, 1]", or "mean over 1 seed, no
    band" when no method has 2 seeds; ``seeds`` are the methods' seed counts."""
    counts = sorted(set(seeds))
    over = f"{counts[0]} seed{'s' if counts[0] > 1 else ''}" if len(counts) == 1 else "n seeds (per method)"
    if counts[-1] < 2:
        return f"mean over {over}, no {mark}"
    return f"mean over {over};\n{mark}: 95% t-interval{clip_note(bounds)}"


def seed_band_figure(
    curves: Mapping[str, tuple[Any, Any]],
    ylabel: str,
    title: str,
    log_y: bool = False,
    xlabel: str = "round",
    bounds: tuple[float, float] = UNBOUNDED,
) -> Figure:
    """One line per method (the mean over seeds) with a shaded band: the 95% Student-t confidence
    interval of the mean over seeds clipped to ``bounds`` (:func:`fedlora_jax.analysis.stats.ci_band`),
    drawn when the method has 2 seeds or more. Legend: "<method> (n=<seeds>)" under
    :func:`band_legend_title`.

    Args:
      curves: method name -> (rounds [R], values [S, R]); NaN marks a round a seed did not reach
        or did not evaluate, and is left out of that round's mean and band.
      ylabel: y axis label.
      title: figure title.
      log_y: logarithmic y axis; when some value is <= 0 (e.g. an exact aggregation with zero
        divergence) a symmetric log axis, linear below the smallest positive value, is used.
      xlabel: x axis label.
      bounds: (low, high) the values can take, e.g. (0, 1) for an accuracy.

    Returns:
      The figure (on an Agg canvas).
    """
    if not curves:
        raise ValueError("seed_band_figure needs at least one curve")
    figure, axes = _curve_figure(title, xlabel, ylabel)
    finite, seeds = [], []
    for index, (name, (rounds, values)) in enumerate(curves.items()):
        rounds = np.asarray(rounds, dtype=np.float64)
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        if values.shape[1] != rounds.shape[0]:
            raise ValueError(f"curve {name!r}: {rounds.shape[0]} rounds but values of shape {values.shape}")
        seen = ~np.all(np.isnan(values), axis=0)
        rounds, values = rounds[seen], values[:, seen]
        mean, low, high = ci_band(values, bounds=bounds)
        style = _line_style(index, len(rounds))
        axes.plot(rounds, mean, label=f"{name} (n={values.shape[0]})", **style)
        if values.shape[0] > 1:
            axes.fill_between(rounds, low, high, color=style["color"], alpha=0.15, linewidth=0)
        finite.append(values[np.isfinite(values)])
        seeds.append(values.shape[0])
    if log_y:
        _log_scale(axes, np.concatenate(finite))
    _legend(axes, band_legend_title(seeds, bounds))
    return figure


def plot_seed_bands(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    ylabel: str,
    title: str,
    log_y: bool = False,
    xlabel: str = "round",
    bounds: tuple[float, float] = UNBOUNDED,
) -> Path:
    """Draws :func:`seed_band_figure` (the arguments but ``path`` are its own) and saves it as a
    PNG at ``path`` (parent folders are created); returns the path written."""
    return _save(seed_band_figure(curves, ylabel, title, log_y=log_y, xlabel=xlabel, bounds=bounds), path)


def _log_scale(axes: Any, values: np.ndarray) -> None:
    """A log y axis; symmetric log (linear below the smallest positive value) when some value is <= 0."""
    positive = values[values > 0]
    if positive.size == values.size and positive.size:
        axes.set_yscale("log")
    else:
        axes.set_yscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)


def plot_module_divergence(
    modules: Sequence[str],
    values: Mapping[str, Any],
    path: str | os.PathLike,
    title: str = "Aggregation divergence per LoRA module",
) -> Path:
    """One marker per (method, module): the divergence averaged over rounds, mean over seeds,
    with its 95% Student-t interval over seeds (clipped at 0) as an error bar; log y axis.

    Args:
      modules: the LoRA module names [M] in layout order (e.g. ``bert.layers.0.attention.query``);
        their common dotted prefix is left out of the tick labels.
      values: method name -> values [S, M] (one row per seed).
      path: output PNG file (parent folders are created).
      title: figure title.

    Returns:
      The path written.
    """
    if not values:
        raise ValueError("plot_module_divergence needs at least one method")
    parts = [m.split(".") for m in modules]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    labels = [".".join(p[common:]) for p in parts]
    figure = Figure(figsize=(max(7.0, 0.22 * len(modules) + 2.5), 4.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_ylabel("divergence (mean over rounds)")
    axes.grid(True, alpha=0.3)
    x = np.arange(len(modules), dtype=np.float64)
    width = 0.7 / len(values)
    finite, seeds = [], []
    for index, (name, per_seed) in enumerate(values.items()):
        per_seed = np.atleast_2d(np.asarray(per_seed, dtype=np.float64))
        if per_seed.shape[1] != len(modules):
            raise ValueError(f"method {name!r}: {len(modules)} modules but values of shape {per_seed.shape}")
        mean, low, high = ci_band(per_seed, bounds=(0.0, np.inf))
        style = _line_style(index, 0)
        offset = x + (index - (len(values) - 1) / 2) * width
        axes.errorbar(offset, mean, yerr=[mean - low, high - mean], fmt=_MARKERS[index % len(_MARKERS)],
                      color=style["color"], markersize=4, capsize=2, linewidth=1,
                      label=f"{name} (n={per_seed.shape[0]})")
        finite.append(per_seed[np.isfinite(per_seed)])
        seeds.append(per_seed.shape[0])
    axes.set_xticks(x, labels, rotation=90, fontsize=7)
    _log_scale(axes, np.concatenate(finite))
    _legend(axes, band_legend_title(seeds, (0.0, np.inf), mark="bar"))
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


def plot_canary_scores(results: Mapping[str, Mapping], path: str | os.PathLike) -> Path:
    """Histograms of canary scores, in vs out, one panel per audited level (audit.json's levels).

    Args:
      results: level -> {"scores": [m], "included": [m] bools, "epsilon_lower_bound",
        "epsilon_accounted"} as :func:`fedlora_jax.run.audit.audit` returns.
      path: output PNG file.
    """
    figure = Figure(figsize=(6.0 * len(results), 4.0), dpi=120)
    FigureCanvasAgg(figure)
    for i, (level, r) in enumerate(results.items()):
        axes = figure.add_subplot(1, len(results), i + 1)
        scores, included = np.asarray(r["scores"]), np.asarray(r["included"], bool)
        bins = np.histogram_bin_edges(scores, bins=40)
        axes.hist(scores[~included], bins=bins, alpha=0.6, label=f"out ({(~included).sum()})")
        axes.hist(scores[included], bins=bins, alpha=0.6, label=f"in ({included.sum()})")
        accounted = r["epsilon_accounted"]
        accounted = "inf" if accounted is None else f"{accounted:.2f}"
        axes.set_title(f"{level}: lower bound {r['epsilon_lower_bound']:.2f}, accounted {accounted}")
        axes.set_xlabel("canary score" if level == "record_level" else "cosine with the released update")
        axes.set_ylabel("canaries")
        axes.legend()
    return _save(figure, path)


def plot_audit_bounds(rows: Sequence[Mapping], path: str | os.PathLike, title: str) -> Path:
    """Audited lower bound against accounted epsilon, one point per audit, with the diagonal a
    bound may never cross and the largest bound the canaries can certify.

    Args:
      rows: {"label", "epsilon_accounted", "epsilon_lower_bound", "largest_certifiable"} each.
      path: output PNG file.
      title: figure title.
    """
    figure, axes = _curve_figure(title, "accounted epsilon", "audited lower bound on epsilon (95%)")
    axes.xaxis.set_major_locator(MaxNLocator())
    top = max(max(r["epsilon_accounted"], r["epsilon_lower_bound"]) for r in rows) * 1.1
    axes.plot([0, top], [0, top], color="grey", linestyle="--", label="bound = accounted")
    for i, r in enumerate(rows):
        style = _line_style(i, 1)
        axes.scatter([r["epsilon_accounted"]], [r["epsilon_lower_bound"]], color=style["color"],
                     marker=style["marker"], s=60, label=r["label"], zorder=3)
    for ceiling in sorted({round(r["largest_certifiable"], 3) for r in rows}):
        axes.axhline(ceiling, color="black", linestyle=":", alpha=0.6, label=f"largest certifiable ({ceiling:.2f})")
    axes.set_xlim(0, top)
    axes.set_ylim(0, top)
    _legend(axes)
    return _save(figure, path)
