"""``keras-rotconv explain``: the derivation's worked example, in numbers.

One channel, stride 1, no padding: a 4x4 input ``a``, a 2x2 kernel ``w`` and
the 3x3 output ``z[p, q] = Σ_{m, n} a[p + m, q + n] · w[m, n]``. Given the
output delta ``δ = dC/dz``, the chain rule gives the input delta term by
term: ``a[i, j]`` met ``w[m, n]`` in output ``z[i - m, j - n]``, so::

    dC/da[i, j] = Σ over (p, q, m, n) with p + m = i, q + n = j
                      of δ[p, q] · w[m, n]

Counted the other way round, this is one convolution: pad ``δ`` with
``k - 1 = 1`` zeros on every side, rotate ``w`` by 180 degrees, and slide
the rotated kernel over the padded delta (a "full" convolution). The example
computes both, and the layer's own backward rule as a third witness, and
shows that they agree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from keras_rotconv import ops

KERNEL = np.array([[1, 2], [3, 4]], dtype=np.float64)
OUTPUT_DELTA = np.array([[1, 0, -1], [2, 1, 0], [0, -2, 3]], dtype=np.float64)
# The input position whose window of the padded delta is spelled out.
SHOWN_POSITION = (1, 2)


def chain_rule_sums(delta: np.ndarray, w: np.ndarray):
    """``dC/da`` by the chain rule, one term at a time.

    Returns the input delta and, for every input position, the list of its
    terms as ``((p, q), (m, n))``: ``δ[p, q] · w[m, n]``.
    """
    k_rows, k_cols = w.shape
    rows, cols = delta.shape[0] + k_rows - 1, delta.shape[1] + k_cols - 1
    grad = np.zeros((rows, cols))
    terms: dict[tuple[int, int], list] = {
        (i, j): [] for i in range(rows) for j in range(cols)
    }
    for p in range(delta.shape[0]):
        for q in range(delta.shape[1]):
            for m in range(k_rows):
                for n in range(k_cols):
                    grad[p + m, q + n] += delta[p, q] * w[m, n]
                    terms[(p + m, q + n)].append(((p, q), (m, n)))
    return grad, terms


def full_convolution_rotated(delta: np.ndarray, w: np.ndarray):
    """``(δ * rot180(w))_full``: returns it, the padded delta and the
    rotated kernel."""
    k_rows, k_cols = w.shape
    padded = np.pad(delta, ((k_rows - 1, k_rows - 1), (k_cols - 1, k_cols - 1)))
    rotated = w[::-1, ::-1]
    rows = padded.shape[0] - k_rows + 1
    cols = padded.shape[1] - k_cols + 1
    out = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            out[i, j] = np.sum(padded[i : i + k_rows, j : j + k_cols] * rotated)
    return out, padded, rotated


def layer_rule(delta: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The same input delta from ``keras_rotconv.ops.input_delta``, the rule
    RotConv2D's backward pass runs."""
    spatial = tuple(d + k - 1 for d, k in zip(delta.shape, w.shape))
    out = ops.input_delta(
        delta[None, :, :, None],
        w[:, :, None, None],
        spatial_shape=spatial,
        strides=(1, 1),
        pairs=((0, 0), (0, 0)),
        dilation=(1, 1),
    )
    return np.asarray(out)[0, :, :, 0]


def run(plot: str | Path | None = None, file: TextIO | None = None) -> int:
    """Prints the worked example; returns 0 when all three computations
    agree, 1 otherwise. With ``plot``, also writes the figure there."""
    file = file or sys.stdout
    w, delta = KERNEL, OUTPUT_DELTA
    by_terms, terms = chain_rule_sums(delta, w)
    by_conv, padded, rotated = full_convolution_rotated(delta, w)
    by_layer = layer_rule(delta, w)

    def show(title, matrix):
        print(f"{title}:", file=file)
        for row in matrix:
            print("  " + " ".join(f"{v:4g}" for v in row), file=file)

    print(
        f"A {by_terms.shape[0]}x{by_terms.shape[1]} input, a "
        f"{w.shape[0]}x{w.shape[1]} kernel w, stride 1, no padding: the "
        f"output z and its delta δ = dC/dz are "
        f"{delta.shape[0]}x{delta.shape[1]}.",
        file=file,
    )
    show("kernel w", w)
    show("output delta δ", delta)
    print(
        "\n1. Chain rule: dC/da[i,j] = Σ δ[p,q]·w[m,n] over p+m=i, q+n=j",
        file=file,
    )
    for (i, j), position_terms in terms.items():
        sums = " + ".join(
            f"δ[{p},{q}]·w[{m},{n}]" for (p, q), (m, n) in position_terms
        )
        values = " + ".join(
            f"({delta[p, q]:g})({w[m, n]:g})"
            for (p, q), (m, n) in position_terms
        )
        print(
            f"  dC/da[{i},{j}] = {sums}\n{'':13}= {values} = "
            f"{by_terms[i, j]:g}",
            file=file,
        )
    print(
        "\n2. Full convolution with the rotated kernel: pad δ with k-1 = "
        f"{w.shape[0] - 1} zeros, rotate w by 180 degrees, slide.",
        file=file,
    )
    show("padded δ", padded)
    show("rot180(w)", rotated)
    i, j = SHOWN_POSITION
    window = padded[i : i + w.shape[0], j : j + w.shape[1]]
    products = " + ".join(
        f"({a:g})({b:g})" for a, b in zip(window.ravel(), rotated.ravel())
    )
    print(
        f"For example, position {i},{j}: the {w.shape[0]}x{w.shape[1]} "
        f"window of padded δ starting there, times rot180(w): {products} = "
        f"{by_conv[i, j]:g}",
        file=file,
    )
    print("\nSide by side:", file=file)
    print(f"  {'chain rule':<22}  {'(δ * rot180(w))_full':<22}", file=file)
    for left, right in zip(by_terms, by_conv):
        cells = [" ".join(f"{v:4g}" for v in row) for row in (left, right)]
        print(f"  {cells[0]:<22}  {cells[1]:<22}", file=file)
    largest = float(np.max(np.abs(by_terms - by_conv)))
    layer_largest = float(np.max(np.abs(by_terms - by_layer)))
    agree = largest == 0 and layer_largest == 0
    print(
        f"\nLargest difference between the two: {largest:g}. RotConv2D's "
        f"backward rule (keras_rotconv.ops.input_delta) differs from them "
        f"by {layer_largest:g}.",
        file=file,
    )
    print(
        "They are equal." if agree else "They DIFFER: the derivation fails.",
        file=file,
    )
    if plot is not None:
        from keras_rotconv.tools import plots

        plots.explain_figure(
            w, rotated, delta, padded, by_conv, SHOWN_POSITION, plot
        )
        print(f"Figure written to {plot}", file=file)
    return 0 if agree else 1
