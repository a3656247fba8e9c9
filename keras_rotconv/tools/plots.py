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
    path = Path(path)
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


def explain_figure(
    kernel: np.ndarray,
    rotated: np.ndarray,
    output_delta: np.ndarray,
    padded_delta: np.ndarray,
    input_delta: np.ndarray,
    position: tuple[int, int],
    path: str | os.PathLike,
) -> Path:
    """The arrays of the worked example, each cell labelled, with the window
    of the padded delta that gives ``input_delta[position]`` outlined."""
    from matplotlib.patches import Rectangle

    panels = (
        ("kernel w", kernel),
        ("rot180(w)", rotated),
        ("output delta δ", output_delta),
        ("δ padded with k-1 zeros", padded_delta),
        ("input delta\n(δ * rot180(w))_full", input_delta),
    )
    figure, all_axes = _figure(ncols=len(panels), width=15, height=3.6)
    for axes, (title, array) in zip(all_axes, panels):
        limit = max(float(np.max(np.abs(array))), 1.0)
        axes.imshow(array, cmap="coolwarm", vmin=-limit, vmax=limit)
        for (i, j), value in np.ndenumerate(array):
            dark = abs(value) > 0.6 * limit
            axes.text(
                j,
                i,
                f"{value:g}",
                ha="center",
                va="center",
                color="white" if dark else "black",
            )
        axes.set_xticks(range(array.shape[1]))
        axes.set_yticks(range(array.shape[0]))
        axes.set_title(title)
    i, j = position
    rows, cols = kernel.shape
    all_axes[3].add_patch(
        Rectangle((j - 0.5, i - 0.5), cols, rows, fill=False, linewidth=3)
    )
    all_axes[4].add_patch(
        Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=3)
    )
    figure.suptitle(
        "Input delta = full convolution of the output delta with the kernel "
        f"rotated by 180 degrees (outlined: the window that gives "
        f"position {i},{j})"
    )
    return _save(figure, path)
