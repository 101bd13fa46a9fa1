"""Figures for run reports, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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
