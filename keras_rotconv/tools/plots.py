"""Figures for the command line and the examples, written straight to files.

Each figure is a ``matplotlib.figure.Figure`` saved with its own canvas, not
through ``pyplot``: nothing opens a window or needs a display, and no global
backend is switched for the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure(*, ncols: int, width: float, height: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, ncols)


def _save(figure, path: str | os.PathLike) -> Path:
    """Saves ``figure`` as a PNG; returns the file written, which gains a
    ``.png`` suffix if ``path`` has none (as matplotlib adds one)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def history_figure(
    history: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str
) -> Path:
    """Loss and accuracy per epoch, training and test, from a Keras
    ``History.history``."""
    figure, (loss_axes, accuracy_axes) = _figure(ncols=2, width=9, height=3.5)
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(epochs, history[metric], "o-", label="training")
        axes.plot(epochs, history[f"val_{metric}"], "s-", label="test")
        _label_epochs(axes, metric)
        axes.legend()
    figure.suptitle(title)
    return _save(figure, path)


def confusion_figure(
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Counts of (true class, predicted class) over the test set."""
    count = len(class_names)
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    figure, axes = _figure(ncols=1, width=6.5, height=5.5)
    image = axes.imshow(np.log1p(matrix), cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            light = image.norm(np.log1p(value)) > 0.6
            axes.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if light else "black",
            )
    axes.set_xticks(range(count), class_names, rotation=45, ha="right")
    axes.set_yticks(range(count), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return _save(figure, path)


def comparison_figure(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Learning curves of several models overlaid: ``curves[model][metric]``
    per epoch, for the metrics loss, accuracy and their ``val_`` versions."""
    figure, (loss_axes, accuracy_axes) = _figure(ncols=2, width=10, height=4)
    # The first model wide and pale, the others thin and dashed on top of
    # it: where the curves coincide, both stay visible.
    styles = (
        {"linewidth": 5, "alpha": 0.35, "marker": "o", "markersize": 8},
        {"linewidth": 1.2, "linestyle": "--", "marker": "x"},
        {"linewidth": 1.2, "linestyle": ":", "marker": "+"},
    )
    for (name, history), style in zip(curves.items(), styles):
        epochs = np.arange(1, len(history["loss"]) + 1)
        for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
            for key, split, color in (
                (metric, "training", "tab:blue"),
                (f"val_{metric}", "test", "tab:orange"),
            ):
                axes.plot(
                    epochs,
                    history[key],
                    color=color,
                    label=f"{name}, {split}",
                    **style,
                )
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        _label_epochs(axes, metric)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)


def _label_epochs(axes, metric: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)


def arrays_figure(
    panels: Sequence[tuple[str, np.ndarray, Sequence[tuple]]],
    path: str | os.PathLike,
    title: str,
) -> Path:
    """One panel per ``(title, array, outlines)``: a 1D or 2D array, each
    cell labelled with its value where there are few enough cells, and each
    outline ``(start, extent)`` drawn as a rectangle (a window of the
    derivation)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    # Each panel as wide as its array, so that cells are the same size in
    # every panel (a 9x16 matrix beside a 2x2 kernel).
    # (At least 4 columns wide: room for the panel's title.)
    columns = [max(np.atleast_2d(a).shape[1], 4) for _, a, _ in panels]
    width = 1 + 0.45 * sum(columns) + 0.4 * len(panels)
    figure = Figure(figsize=(width, 4.5), layout="constrained")
    all_axes = figure.subplots(
        1, len(panels), gridspec_kw={"width_ratios": columns}, squeeze=False
    )[0]
    for axes, (name, array, outlines) in zip(all_axes, panels):
        array = np.atleast_2d(np.asarray(array, dtype=np.float64))
        limit = max(float(np.max(np.abs(array))), 1e-12)
        axes.imshow(array, cmap="coolwarm", vmin=-limit, vmax=limit)
        if array.size <= 200:
            _label_cells(axes, array, limit)
        axes.set_xticks(range(array.shape[1]))
        axes.set_yticks(range(array.shape[0]))
        axes.tick_params(labelsize=7)
        axes.set_title(name, fontsize=9)
        for start, extent in outlines:
            # A 1D window is a 2D one on the array's only row.
            (i, j), (rows, cols) = (0, *start)[-2:], (1, *extent)[-2:]
            axes.add_patch(
                Rectangle(
                    (j - 0.5, i - 0.5), cols, rows, fill=False, linewidth=3
                )
            )
    figure.suptitle(title)
    return _save(figure, path)


def _label_cells(axes, array: np.ndarray, limit: float) -> None:
    size = 9 if array.size <= 50 else 6
    for (i, j), value in np.ndenumerate(array):
        axes.text(
            j,
            i,
            f"{value + 0.0:.3g}",
            ha="center",
            va="center",
            fontsize=size,
            color="white" if abs(value) > 0.6 * limit else "black",
        )
