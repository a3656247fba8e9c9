"""``keras-rotconv explain``: the derivation's five steps, in numbers.

One channel, one sample, a small input ``a`` and kernel ``w`` whose values
are small integers, so that every sum can be checked by hand. The parts
follow the argument:

1. ``mlp``: a convolutional layer is an MLP with connections cut and
   weights shared. Its dense matrix ``W`` (one row per output, one column
   per input) holds ``w[k]`` where output ``p`` reads input ``q`` through
   tap ``k`` and 0 elsewhere, so ``z = W·a``; the MLP's backward pass
   ``Wᵀ·δ`` is the full convolution with ``rot180(w)``: the rotation is
   the transpose.
2. ``delta``: the input delta counted on fingers, ``dC/da[q] = Σ δ[p]·w[k]``
   over the ``(p, k)`` that read ``q``, beside ``(δ * rot180(w))_full``.
3. ``kernel``: ``dC/dw[k] = Σ a[q]·δ[p]`` by the chain rule, beside the
   valid correlation ``a ⋆ δ``.
4. ``bias``: ``dC/db = Σ δ``.
5. ``chain``: two layers with a ``tanh`` between them: feed forward, the
   output error, ``δ1 = (δ2 * rot180(w2))_full ⊙ tanh'(z1)``, and every
   gradient, checked against finite differences.

(Steps 3 and 4 of the derivation's own numbering, "the sums are a full
convolution" and "the weight update", are the parts ``delta`` and
``kernel``/``bias``.) With a stride ``s`` the delta is first spread: ``s - 1``
zeros between neighbouring entries, since output ``p`` came from input
position ``p·s``. With a dilation ``d`` the kernel's taps sit ``d`` apart.
``"same"`` padding adds zeros around the input, which the full convolution's
result loses again (cropped off).

Every part computes its result twice, as the chain rule's sums and as the
derivation's convolution, and a third time with the package's own rule
(``keras_rotconv.ops``, what RotConv's backward pass runs); ``run`` returns
1 when they disagree.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import keras
import numpy as np

from keras_rotconv import ops as rotconv_ops
from keras_rotconv import reference

PARTS = ("mlp", "delta", "kernel", "bias", "chain")

# The sums have a handful of terms: float64 rounding is ~1e-16 relative.
RTOL = 1e-10
# Central differences of the chain part's cost, step 1e-5: truncation error
# ~1e-10, rounding ~1e-11, relative to gradients of order 1.
FD_STEP = 1e-5
FD_RTOL = 1e-7

# Cycled over the output delta and the input, row by row. The first nine
# values are the 3x3 delta of the original worked example; seven input
# values do not line up with rows of 4, so neighbouring rows differ.
_DELTA_VALUES = (1, 0, -1, 2, 1, 0, 0, -2, 3)
_INPUT_VALUES = (1, 2, 0, -1, 3, 1, -2)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One convolution: the same size, kernel, stride and dilation on every
    one of ``rank`` spatial axes."""

    rank: int = 2
    size: int = 4
    kernel: int = 2
    stride: int = 1
    dilation: int = 1
    padding: str = "valid"

    def __post_init__(self):
        if self.rank not in (1, 2):
            raise ValueError(f"rank must be 1 or 2. Received: {self.rank}")
        if self.padding not in ("valid", "same"):
            raise ValueError(
                f"padding must be 'valid' or 'same'. Received: {self.padding}"
            )
        for name in ("size", "kernel", "stride", "dilation"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be positive. Received: {getattr(self, name)}"
                )
        if self.stride > 1 and self.dilation > 1:
            raise ValueError(
                "a stride and a dilation above 1 together are refused by "
                "Keras's convolution layers (and TensorFlow's convolution). "
                f"Received: stride={self.stride}, dilation={self.dilation}"
            )
        if self.out < 1:
            raise ValueError(
                f"a kernel of {self.kernel} taps at dilation {self.dilation} "
                f"spans {self.span} positions, more than the input's "
                f"{self.size} with 'valid' padding"
            )

    @property
    def span(self) -> int:
        """The dilated kernel's extent."""
        return (self.kernel - 1) * self.dilation + 1

    @property
    def out(self) -> int:
        """Output positions per axis."""
        if self.padding == "same":
            return -(-self.size // self.stride)
        return (self.size - self.span) // self.stride + 1

    @property
    def pad(self) -> tuple[int, int]:
        """Zeros before and after the input on every axis (the odd one after,
        as TensorFlow, JAX and Keras pad)."""
        if self.padding == "valid":
            return (0, 0)
        total = max((self.out - 1) * self.stride + self.span - self.size, 0)
        return (total // 2, total - total // 2)

    @property
    def padded(self) -> int:
        return self.size + sum(self.pad)

    @property
    def reached(self) -> int:
        """Padded positions that some window covers; the rest are read by no
        output."""
        return (self.out - 1) * self.stride + self.span

    def shape(self, n: int) -> tuple[int, ...]:
        return (n,) * self.rank

    def describe(self) -> str:
        if self.rank == 1:
            sizes = (
                f"a length-{self.size} input, a {self.kernel}-tap kernel w",
                f"length {self.out}",
            )
        else:
            sizes = (
                f"a {self.size}x{self.size} input, a {self.kernel}x"
                f"{self.kernel} kernel w",
                f"{self.out}x{self.out}",
            )
        return (
            f"{sizes[0]}, stride {self.stride}, dilation {self.dilation}, "
            f"{self.padding} padding {self.pad}: the output z and its delta "
            f"δ = dC/dz are {sizes[1]}"
        )


def kernel_values(setup: Setup) -> np.ndarray:
    """``1, 2, 3, ...`` row by row: a rotation is easy to see."""
    count = setup.kernel**setup.rank
    return np.arange(1.0, count + 1).reshape(setup.shape(setup.kernel))


def output_delta(setup: Setup) -> np.ndarray:
    return _cycled(_DELTA_VALUES, setup.shape(setup.out))


def input_values(setup: Setup) -> np.ndarray:
    return _cycled(_INPUT_VALUES, setup.shape(setup.size))


def _cycled(values, shape) -> np.ndarray:
    flat = [values[i % len(values)] for i in range(math.prod(shape))]
    return np.array(flat, dtype=np.float64).reshape(shape)


# The two computations of each step, in plain NumPy.


def links(setup: Setup):
    """Every ``(p, k, q)``: output ``p`` reads input ``q`` through tap ``k``,
    ``q = p·s + k·d - pad`` inside the input."""
    before = setup.pad[0]
    for p in np.ndindex(*setup.shape(setup.out)):
        for k in np.ndindex(*setup.shape(setup.kernel)):
            q = tuple(
                pi * setup.stride + ki * setup.dilation - before
                for pi, ki in zip(p, k)
            )
            if all(0 <= qi < setup.size for qi in q):
                yield p, k, q


def dense_matrix(w: np.ndarray, setup: Setup) -> np.ndarray:
    """The MLP the layer is: ``W[p, q] = w[k]`` where output ``p`` reads input
    ``q`` through tap ``k``, 0 where the connection is cut. Rows and columns
    run over positions row by row.

    >>> dense_matrix(np.array([1.0, 2.0]), Setup(rank=1, size=4))
    array([[1., 2., 0., 0.],
           [0., 1., 2., 0.],
           [0., 0., 1., 2.]])
    """
    outputs, inputs = setup.shape(setup.out), setup.shape(setup.size)
    matrix = np.zeros((math.prod(outputs), math.prod(inputs)))
    for p, k, q in links(setup):
        matrix[
            np.ravel_multi_index(p, outputs), np.ravel_multi_index(q, inputs)
        ] = w[k]
    return matrix


def correlate(x, w, stride: int = 1, dilation: int = 1) -> np.ndarray:
    """``out[p] = Σ_k x[p·stride + k·dilation] · w[k]``, every window inside
    ``x`` ("valid")."""
    span = [(k - 1) * dilation + 1 for k in w.shape]
    shape = [(n - e) // stride + 1 for n, e in zip(x.shape, span)]
    out = np.zeros(shape)
    for k in np.ndindex(*w.shape):
        window = tuple(
            slice(ki * dilation, ki * dilation + (n - 1) * stride + 1, stride)
            for ki, n in zip(k, shape)
        )
        out += w[k] * x[window]
    return out


def pad_input(a: np.ndarray, setup: Setup) -> np.ndarray:
    return np.pad(a, [setup.pad] * setup.rank)


def forward(a: np.ndarray, w: np.ndarray, setup: Setup) -> np.ndarray:
    """``z = a * w``: the kernel slid over the padded input."""
    z = correlate(pad_input(a, setup), w, setup.stride, setup.dilation)
    return z[tuple(slice(setup.out) for _ in range(setup.rank))]


def spread(delta: np.ndarray, stride: int) -> np.ndarray:
    """``stride - 1`` zeros between neighbouring entries on every axis."""
    shape = [(n - 1) * stride + 1 for n in delta.shape]
    out = np.zeros(shape)
    out[tuple(slice(None, None, stride) for _ in shape)] = delta
    return out


def dilate(w: np.ndarray, dilation: int) -> np.ndarray:
    """The kernel as the input sees it: ``dilation - 1`` zeros between
    taps."""
    return spread(w, dilation)


@dataclasses.dataclass(frozen=True)
class FullConvolution:
    """``(δ * rot180(w))_full`` and the arrays it is made from."""

    result: np.ndarray  # on the input's positions
    spread: np.ndarray  # δ with stride - 1 zeros between entries
    padded: np.ndarray  # spread δ with span - 1 zeros around it
    rotated: np.ndarray  # rot180(w)


def full_convolution_rotated(
    delta: np.ndarray, w: np.ndarray, setup: Setup
) -> FullConvolution:
    """Spread ``δ``, pad it with ``span - 1`` zeros on every side, slide
    ``rot180(w)`` over it at the layer's dilation. Position ``u`` of the
    result is padded input position ``u``; the forward padding is cropped
    off, and padded positions no window reached get 0.

    The ``Wᵀ·δ`` of ``dense_matrix``'s example, as a convolution:

    >>> delta, w = np.array([1.0, -1.0, 2.0]), np.array([1.0, 2.0])
    >>> full = full_convolution_rotated(delta, w, Setup(rank=1, size=4))
    >>> full.padded, full.rotated, full.result
    (array([ 0.,  1., -1.,  2.,  0.]), array([2., 1.]), array([1., 1., 0., 4.]))
    """
    spread_delta = spread(delta, setup.stride)
    padded = np.pad(spread_delta, setup.span - 1)
    rotated = np.flip(w)
    full = correlate(padded, rotated, dilation=setup.dilation)
    on_padded = np.zeros(setup.shape(setup.padded))
    on_padded[tuple(slice(n) for n in full.shape)] = full
    before = setup.pad[0]
    crop = tuple(slice(before, before + setup.size) for _ in full.shape)
    return FullConvolution(on_padded[crop], spread_delta, padded, rotated)


def chain_rule_input_delta(delta: np.ndarray, w: np.ndarray, setup: Setup):
    """``dC/da[q] = Σ δ[p]·w[k]`` over the ``(p, k)`` that read ``q``.

    Returns the input delta and, for every input position, its terms as
    ``(p, k)`` pairs.
    """
    grad = np.zeros(setup.shape(setup.size))
    terms = {q: [] for q in np.ndindex(*grad.shape)}
    for p, k, q in links(setup):
        grad[q] += delta[p] * w[k]
        terms[q].append((p, k))
    return grad, terms


def chain_rule_kernel_gradient(a: np.ndarray, delta: np.ndarray, setup: Setup):
    """``dC/dw[k] = Σ a[q]·δ[p]`` over the ``(p, q)`` that tap ``k`` links
    (a padding zero adds nothing). Returns the gradient and its terms as
    ``(q, p)`` pairs per tap."""
    grad = np.zeros(setup.shape(setup.kernel))
    terms = {k: [] for k in np.ndindex(*grad.shape)}
    for p, k, q in links(setup):
        grad[k] += a[q] * delta[p]
        terms[k].append((q, p))
    return grad, terms


def valid_correlation(a: np.ndarray, delta: np.ndarray, setup: Setup):
    """``a ⋆ δ``: the spread delta slid over the padded input, one window
    per tap, ``dilation`` apart. Returns the gradient, the padded input and
    the spread delta."""
    padded = pad_input(a, setup)
    spread_delta = spread(delta, setup.stride)
    grad = correlate(padded, spread_delta, stride=setup.dilation)
    taps = tuple(slice(setup.kernel) for _ in grad.shape)
    return grad[taps], padded, spread_delta


def chain_rule_bias_gradient(delta: np.ndarray) -> float:
    """``dz[p]/db = 1`` for every output ``p``: one term ``δ[p]·1`` each."""
    total = 0.0
    for p in np.ndindex(*delta.shape):
        total += delta[p] * 1.0
    return total


# The package's rules: what RotConv's backward pass runs, on one sample and
# one channel.


def _batched(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)[None, ..., None]


def _kernel(w: np.ndarray) -> np.ndarray:
    return np.asarray(w, dtype=np.float64)[..., None, None]


def _rule_arguments(setup: Setup) -> dict:
    return dict(
        strides=setup.shape(setup.stride),
        pairs=(setup.pad,) * setup.rank,
        dilation=setup.shape(setup.dilation),
    )


def rule_forward(a: np.ndarray, w: np.ndarray, setup: Setup) -> np.ndarray:
    """``keras_rotconv.ops.conv``, RotConv's forward pass."""
    z = rotconv_ops.conv(_batched(a), _kernel(w), **_rule_arguments(setup))
    return keras.ops.convert_to_numpy(z)[0, ..., 0]


def rule_input_delta(delta, w, setup: Setup) -> np.ndarray:
    """``keras_rotconv.ops.input_delta``."""
    grad = rotconv_ops.input_delta(
        _batched(delta),
        _kernel(w),
        spatial_shape=setup.shape(setup.size),
        **_rule_arguments(setup),
    )
    return keras.ops.convert_to_numpy(grad)[0, ..., 0]


def rule_kernel_gradient(a, delta, setup: Setup) -> np.ndarray:
    """``keras_rotconv.ops.kernel_gradient``."""
    grad = rotconv_ops.kernel_gradient(
        _batched(a),
        _batched(delta),
        kernel_size=setup.shape(setup.kernel),
        **_rule_arguments(setup),
    )
    return keras.ops.convert_to_numpy(grad)[..., 0, 0]


def rule_bias_gradient(delta) -> float:
    """``keras_rotconv.ops.bias_gradient``."""
    grad = rotconv_ops.bias_gradient(
        keras.ops.convert_to_tensor(_batched(delta))
    )
    return float(keras.ops.convert_to_numpy(grad)[0])


# Text.


def _index(position) -> str:
    return ",".join(map(str, position))


def _number(value) -> str:
    return f"{float(value) + 0.0:.4g}"


def _rows(array) -> list[str]:
    array = np.atleast_2d(array)
    cells = [[_number(v) for v in row] for row in array]
    width = max(len(c) for row in cells for c in row)
    return [" ".join(f"{c:>{width}}" for c in row) for row in cells]


def _show(out: TextIO, title: str, array) -> None:
    print(f"{title}:", file=out)
    for row in _rows(array):
        print(f"  {row}", file=out)


def _side_by_side(out: TextIO, arrays: dict) -> None:
    columns = [[title, *_rows(array)] for title, array in arrays.items()]
    widths = [max(len(line) for line in column) for column in columns]
    for lines in itertools.zip_longest(*columns, fillvalue=""):
        print(
            (
                "  " + "   ".join(f"{t:<{w}}" for t, w in zip(lines, widths))
            ).rstrip(),
            file=out,
        )


def _show_matrix(out: TextIO, title, matrix, rows: tuple, columns: tuple):
    """A dense matrix with its rows and columns labelled by position;
    ``rows`` and ``columns`` are ``(name, grid shape)``."""
    labels = [f"{rows[0]}[{_index(p)}]" for p in np.ndindex(*rows[1])]
    heads = [_index(q) for q in np.ndindex(*columns[1])]
    cells = [[_number(v) for v in row] for row in matrix]
    width = max(len(c) for c in heads + [c for row in cells for c in row])
    label_width = max(len(label) for label in labels)
    print(f"{title}:", file=out)
    head = " ".join(f"{h:>{width}}" for h in heads)
    print(f"  {columns[0] + ':':>{label_width}} {head}", file=out)
    for label, row in zip(labels, cells):
        line = " ".join(f"{c:>{width}}" for c in row)
        print(f"  {label:>{label_width}} {line}", file=out)


def _relative_difference(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.max(np.abs(expected))) or 1.0
    return float(np.max(np.abs(actual - expected))) / scale


def _agreement(out: TextIO, expected_name: str, expected, others) -> bool:
    """Prints how far each of ``others`` (name: array) is from ``expected``;
    whether all are within ``RTOL``."""
    agree = True
    for name, value in others.items():
        difference = _relative_difference(value, expected)
        agree = agree and difference <= RTOL
        print(
            f"Largest difference, {name} against {expected_name}: "
            f"{difference:.2g} (relative to the largest value).",
            file=out,
        )
    print(
        "They are equal." if agree else "They DIFFER: the derivation fails.",
        file=out,
    )
    return agree


def _shown_position(setup: Setup) -> tuple[int, ...]:
    """The input position whose window is spelled out: (1, 2) in 4x4."""
    last = setup.size // 2
    return (*(max(last - 1, 0),) * (setup.rank - 1), last)


def _heading(out: TextIO, part: str, text: str, setup: Setup) -> None:
    step = PARTS.index(part) + 1
    print(f"\n=== {step}. {part}: {text}", file=out)
    print(f"{setup.describe()[0].upper()}{setup.describe()[1:]}.", file=out)


# The parts.


@dataclasses.dataclass(frozen=True)
class Part:
    """What a part found: whether its computations agree, and the arrays of
    its figure as ``(title, array, outlines)``, an outline being the
    ``(start, extent)`` of a window."""

    agree: bool
    title: str
    panels: tuple


def part_mlp(setup: Setup, out: TextIO) -> Part:
    """Step 1: the layer as an MLP; its transpose is the rotated kernel."""
    _heading(
        out, "mlp", "an MLP with connections cut and weights shared", setup
    )
    w, a = kernel_values(setup), input_values(setup)
    matrix = dense_matrix(w, setup)
    print(
        "Flatten the input a and the output z position by position. Output "
        "z[p] reads input a[q] through tap k when q = p·s + k·d - pad; in the "
        "MLP that connection has weight w[k], and every other connection is "
        "cut (0). So z = W·a with the dense matrix W:",
        file=out,
    )
    outputs, inputs = setup.shape(setup.out), setup.shape(setup.size)
    _show_matrix(out, "W", matrix, ("z", outputs), ("a", inputs))
    counts = ", ".join(
        f"w[{_index(k)}] {np.count_nonzero(matrix == w[k])}x"
        for k in np.ndindex(*w.shape)
    )
    print(
        f"{np.count_nonzero(matrix == 0)} of {matrix.size} connections are "
        f"cut; the weights are shared: {counts}.",
        file=out,
    )
    _show(out, "input a", a)
    by_matrix = (matrix @ a.ravel()).reshape(setup.shape(setup.out))
    _side_by_side(out, {"W·a": by_matrix, "a * w": forward(a, w, setup)})
    forward_agree = _agreement(
        out,
        "W·a",
        by_matrix,
        {
            "a * w": forward(a, w, setup),
            "keras_rotconv.ops.conv": rule_forward(a, w, setup),
        },
    )
    backward_agree, panels = _mlp_backward(out, setup, matrix)
    title = "A convolution is an MLP with cut and shared weights; Wᵀ is rot180"
    return Part(forward_agree and backward_agree, title, panels)


def _mlp_backward(out: TextIO, setup: Setup, matrix: np.ndarray):
    """The MLP's backward pass ``Wᵀ·δ`` beside the full convolution."""
    w, delta = kernel_values(setup), output_delta(setup)
    print(
        "\nBackward: z = W·a gives dC/da = Wᵀ·δ, each delta carried back "
        "along the connections its output came in on:",
        file=out,
    )
    outputs, inputs = setup.shape(setup.out), setup.shape(setup.size)
    _show_matrix(out, "Wᵀ", matrix.T, ("a", inputs), ("δ", outputs))
    q = _shown_position(setup)
    row = matrix.T[np.ravel_multi_index(q, setup.shape(setup.size))]
    row = row.reshape(setup.shape(setup.out))
    _show(out, f"Row a[{_index(q)}] of Wᵀ, laid out on δ's positions", row)
    full = full_convolution_rotated(delta, w, setup)
    _show(out, "rot180(w)", full.rotated)
    print(
        "The taps that reached a[q] come in reverse order: the row is "
        "rot180(w) placed over δ (spread by the stride, taps the dilation "
        "apart), so Wᵀ·δ is the full convolution of δ with rot180(w): the "
        "rotation is the transpose.",
        file=out,
    )
    by_transpose = (matrix.T @ delta.ravel()).reshape(setup.shape(setup.size))
    _show(out, "output delta δ", delta)
    _side_by_side(
        out, {"Wᵀ·δ": by_transpose, "(δ * rot180(w))_full": full.result}
    )
    backward_agree = _agreement(
        out,
        "Wᵀ·δ",
        by_transpose,
        {
            "(δ * rot180(w))_full": full.result,
            "keras_rotconv.ops.input_delta": rule_input_delta(delta, w, setup),
        },
    )
    panels = (
        ("W (z = W·a)", matrix, ()),
        ("Wᵀ (dC/da = Wᵀ·δ)", matrix.T, ()),
        (f"row a[{_index(q)}] of Wᵀ on δ's grid", row, ()),
        ("rot180(w)", full.rotated, ()),
    )
    return backward_agree, panels


def _print_terms(out, terms, result, name, left, right, a, b) -> None:
    """``name[i] = Σ left[..]·right[..]`` for every position, with values."""
    for position, position_terms in terms.items():
        label = f"{name}[{_index(position)}]"
        if not position_terms:
            print(f"  {label} = 0 (no term)", file=out)
            continue
        sums = " + ".join(
            f"{left}[{_index(i)}]·{right}[{_index(j)}]"
            for i, j in position_terms
        )
        values = " + ".join(
            f"({_number(a[i])})({_number(b[j])})" for i, j in position_terms
        )
        print(
            f"  {label} = {sums}\n  {'':{len(label)}} = {values} = "
            f"{_number(result[position])}",
            file=out,
        )


def _window(array, start, count: int, step: int):
    """``count`` entries ``step`` apart from ``start`` on every axis."""
    return array[
        tuple(slice(i, i + (count - 1) * step + 1, step) for i in start)
    ]


def _products(window, kernel) -> str:
    return " + ".join(
        f"({_number(x)})({_number(y)})"
        for x, y in zip(window.ravel(), kernel.ravel())
    )


def part_delta(setup: Setup, out: TextIO) -> Part:
    """Steps 2 and 3: the input delta on fingers, and as a full convolution
    with the rotated kernel."""
    _heading(out, "delta", "δ_prev = (δ * rot180(w))_full", setup)
    w, delta = kernel_values(setup), output_delta(setup)
    _show(out, "kernel w", w)
    _show(out, "output delta δ", delta)
    by_terms, terms = chain_rule_input_delta(delta, w, setup)
    print(
        "\nChain rule: a[q] met w[k] in output z[p] when q = p·s + k·d - pad, "
        "so dC/da[q] = Σ δ[p]·w[k] over those (p, k):",
        file=out,
    )
    _print_terms(out, terms, by_terms, "dC/da", "δ", "w", delta, w)
    full = _show_full_convolution(out, setup, delta, w)
    q = _shown_position(setup)
    start = tuple(i + setup.pad[0] for i in q)
    if all(i < setup.reached for i in start):
        window = _window(full.padded, start, setup.kernel, setup.dilation)
        print(
            f"For example, a[{_index(q)}]: the window of padded δ at "
            f"{_index(start)}, times rot180(w): "
            f"{_products(window, full.rotated)} = "
            f"{_number(full.result[q])}",
            file=out,
        )
    print("Side by side:", file=out)
    _side_by_side(
        out, {"chain rule": by_terms, "(δ * rot180(w))_full": full.result}
    )
    agree = _agreement(
        out,
        "the chain rule",
        by_terms,
        {
            "(δ * rot180(w))_full": full.result,
            "keras_rotconv.ops.input_delta": rule_input_delta(delta, w, setup),
        },
    )
    panels = (
        ("kernel w", w, ()),
        ("rot180(w)", full.rotated, ()),
        ("output delta δ", delta, ()),
        (
            "spread δ, padded with span-1 zeros",
            full.padded,
            ((start, setup.shape(setup.span)),),
        ),
        (
            "input delta (δ * rot180(w))_full",
            full.result,
            ((q, (1,) * len(q)),),
        ),
    )
    return Part(agree, "Input delta = (δ * rot180(w))_full", panels)


def _show_full_convolution(out: TextIO, setup: Setup, delta, w):
    """Prints the steps of ``(δ * rot180(w))_full``; returns it."""
    full = full_convolution_rotated(delta, w, setup)
    print(
        "\nThe same sums as one full convolution with the rotated kernel:",
        file=out,
    )
    if setup.stride > 1:
        print(
            f"Output p came from input position p·{setup.stride}: spread δ "
            f"with {setup.stride - 1} zero(s) between neighbouring entries.",
            file=out,
        )
        _show(out, "spread δ", full.spread)
    _show(out, f"δ padded with span - 1 = {setup.span - 1} zeros", full.padded)
    _show(out, "rot180(w)", full.rotated)
    if setup.dilation > 1:
        _show(
            out,
            f"rot180(w) as it slides, taps {setup.dilation} apart",
            dilate(full.rotated, setup.dilation),
        )
    _explain_crop(out, setup)
    return full


def _explain_crop(out: TextIO, setup: Setup) -> None:
    before, after = setup.pad
    if before or after:
        print(
            f"The forward pass padded the input with {before} zero(s) before "
            f"and {after} after; their deltas are cropped off the result.",
            file=out,
        )
    if setup.reached < setup.padded:
        print(
            f"The last {setup.padded - setup.reached} input position(s) are "
            "read by no window (the stride stepped past them): their delta "
            "is 0.",
            file=out,
        )


def part_kernel(setup: Setup, out: TextIO) -> Part:
    """Step 4: the kernel gradient, a valid correlation of the input with
    the delta."""
    _heading(out, "kernel", "dC/dw = a_prev ⋆ δ, a valid correlation", setup)
    a, delta = input_values(setup), output_delta(setup)
    _show(out, "input a", a)
    _show(out, "output delta δ", delta)
    by_terms, terms = chain_rule_kernel_gradient(a, delta, setup)
    print(
        "\nChain rule: w[k] multiplied a[q] in output z[p] when q = p·s + "
        "k·d - pad, so dC/dw[k] = Σ a[q]·δ[p] over those (q, p):",
        file=out,
    )
    _print_terms(out, terms, by_terms, "dC/dw", "a", "δ", a, delta)
    by_correlation, padded, spread_delta = valid_correlation(a, delta, setup)
    print(
        "\nThe same sums as one valid correlation: slide δ over the input "
        "and sum the products; tap k's window starts at k·d.",
        file=out,
    )
    if setup.pad != (0, 0):
        _show(out, f"input padded with {setup.pad} zeros", padded)
    if setup.stride > 1:
        print(
            f"δ spread with {setup.stride - 1} zero(s) between entries, as "
            f"its outputs were {setup.stride} apart:",
            file=out,
        )
        _show(out, "spread δ", spread_delta)
    k = (*setup.shape(0)[:-1], setup.kernel - 1)
    start = tuple(i * setup.dilation for i in k)
    window = _window(padded, start, spread_delta.shape[0], 1)
    print(
        f"For example, w[{_index(k)}]: the window of the input at "
        f"{_index(start)}, times δ: {_products(window, spread_delta)} = "
        f"{_number(by_correlation[k])}",
        file=out,
    )
    print("Side by side:", file=out)
    _side_by_side(out, {"chain rule": by_terms, "a ⋆ δ": by_correlation})
    agree = _agreement(
        out,
        "the chain rule",
        by_terms,
        {
            "a ⋆ δ": by_correlation,
            "keras_rotconv.ops.kernel_gradient": rule_kernel_gradient(
                a, delta, setup
            ),
        },
    )
    panels = (
        ("input a (padded)", padded, ((start, spread_delta.shape),)),
        ("δ (spread)", spread_delta, ()),
        ("dC/dw = a corr δ", by_correlation, ((k, (1,) * len(k)),)),
    )
    return Part(
        agree, "Kernel gradient = valid correlation of a_prev with δ", panels
    )


def part_bias(setup: Setup, out: TextIO) -> Part:
    """Step 4, the bias: every output adds ``b`` once, so ``dC/db = Σ δ``."""
    _heading(out, "bias", "dC/db = Σ δ", setup)
    delta = output_delta(setup)
    _show(out, "output delta δ", delta)
    by_terms = chain_rule_bias_gradient(delta)
    positions = list(np.ndindex(*delta.shape))
    print(
        "Every output is z[p] = (a * w)[p] + b, so dz[p]/db = 1 and\n"
        "  dC/db = Σ_p δ[p]·1 = "
        + " + ".join(f"({_number(delta[p])})" for p in positions)
        + f" = {_number(by_terms)}",
        file=out,
    )
    total = float(np.sum(delta))
    agree = _agreement(
        out,
        "the chain rule",
        np.array(by_terms),
        {
            "Σ δ": np.array(total),
            "keras_rotconv.ops.bias_gradient": np.array(
                rule_bias_gradient(delta)
            ),
        },
    )
    panels = ((f"output delta δ: Σ δ = {_number(total)}", delta, ()),)
    return Part(agree, "Bias gradient = Σ δ", panels)


@dataclasses.dataclass(frozen=True)
class TwoLayers:
    """``a1 = tanh(a0 * w1 + b1)``, ``a2 = z2 = a1 * w2 + b2`` and the cost
    ``C = ½ Σ a2²`` (a target of 0), both layers configured as ``first``
    and ``second`` say."""

    first: Setup
    second: Setup
    a0: np.ndarray
    w1: np.ndarray
    b1: float
    w2: np.ndarray
    b2: float

    @property
    def parameters(self) -> dict:
        return dict(a0=self.a0, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)


# Each gradient of the chain part and what it differentiates by (None: an
# inner delta, no parameter of its own).
CHAIN_GRADIENTS = {
    "δ1": None,
    "dC/dw2": "w2",
    "dC/db2": "b2",
    "dC/dw1": "w1",
    "dC/db1": "b1",
    "δ0": "a0",
}


def two_layers(setup: Setup) -> TwoLayers:
    """Two layers of ``setup``'s kind; the input grows until the second
    layer has an output."""
    for size in itertools.count(setup.size):
        first = dataclasses.replace(setup, size=size)
        try:
            second = dataclasses.replace(setup, size=first.out)
        except ValueError:
            continue
        w = kernel_values(setup)
        # Scaled so that tanh works on its curved part, not saturated.
        return TwoLayers(
            first,
            second,
            input_values(first) / 2,
            w / 10,
            0.1,
            (w.max() + 1 - 2 * w) / 10,
            -0.2,
        )
    raise AssertionError("unreachable")


def tanh_derivative(z):
    return 1 - np.tanh(z) ** 2


def _feed_forward(net: TwoLayers, a0, w1, b1, w2, b2):
    z1 = forward(a0, w1, net.first) + b1
    a1 = np.tanh(z1)
    return z1, a1, forward(a1, w2, net.second) + b2


def backpropagate(net: TwoLayers) -> dict:
    """Step 5 with the convolutions of steps 3 and 4: ``δ2 = a2 - y``, then
    ``δ1 = (δ2 * rot180(w2))_full ⊙ tanh'(z1)`` and the gradients."""
    z1, a1, z2 = _feed_forward(net, **net.parameters)
    delta2 = z2
    back = full_convolution_rotated(delta2, net.w2, net.second).result
    delta1 = back * tanh_derivative(z1)
    return {
        "z1": z1,
        "a1": a1,
        "z2": z2,
        "dC/da1": back,
        "δ1": delta1,
        "dC/dw2": valid_correlation(a1, delta2, net.second)[0],
        "dC/db2": np.sum(delta2),
        "dC/dw1": valid_correlation(net.a0, delta1, net.first)[0],
        "dC/db1": np.sum(delta1),
        "δ0": full_convolution_rotated(delta1, net.w1, net.first).result,
    }


def _reference_arguments(setup: Setup) -> dict:
    return dict(
        strides=setup.shape(setup.stride),
        dilation=setup.shape(setup.dilation),
        padding=setup.padding,
    )


def by_reference(net: TwoLayers) -> dict:
    """The same gradients from ``keras_rotconv.reference``: every sum of the
    chain rule counted in loops."""
    first, second = (
        _reference_arguments(net.first),
        _reference_arguments(net.second),
    )
    w1, w2 = _kernel(net.w1), _kernel(net.w2)
    b1, b2 = np.array([net.b1]), np.array([net.b2])
    a0 = _batched(net.a0)
    z1 = reference.forward(a0, w1, b1, **first)
    a1 = np.tanh(z1)
    z2 = reference.forward(a1, w2, b2, **second)
    delta1, dw2, db2 = reference.layer_backward(
        a1, w2, b2, z2, np.ones_like, z1, tanh_derivative, **second
    )
    back = reference.input_gradient(z2, w2, a1.shape, **second)
    delta0, dw1, db1 = reference.layer_backward(
        a0, w1, b1, back, tanh_derivative, **first
    )
    return {
        "δ1": delta1[0, ..., 0],
        "dC/dw2": dw2[..., 0, 0],
        "dC/db2": db2[0],
        "dC/dw1": dw1[..., 0, 0],
        "dC/db1": db1[0],
        "δ0": delta0[0, ..., 0],
    }


def by_rules(net: TwoLayers) -> dict:
    """The same gradients from the package's rules, in the same order."""
    z1 = rule_forward(net.a0, net.w1, net.first) + net.b1
    a1 = np.tanh(z1)
    delta2 = rule_forward(a1, net.w2, net.second) + net.b2
    back = rule_input_delta(delta2, net.w2, net.second)
    delta1 = back * tanh_derivative(z1)
    return {
        "δ1": delta1,
        "dC/dw2": rule_kernel_gradient(a1, delta2, net.second),
        "dC/db2": rule_bias_gradient(delta2),
        "dC/dw1": rule_kernel_gradient(net.a0, delta1, net.first),
        "dC/db1": rule_bias_gradient(delta1),
        "δ0": rule_input_delta(delta1, net.w1, net.first),
    }


def by_finite_differences(net: TwoLayers) -> dict:
    """``(C(x + h) - C(x - h)) / 2h`` for every entry of every parameter
    (and of the input, for ``δ0``)."""

    def cost(**changed) -> float:
        *_, z2 = _feed_forward(net, **{**net.parameters, **changed})
        return 0.5 * float(np.sum(z2**2))

    grads = {}
    for name, key in CHAIN_GRADIENTS.items():
        if key is None:
            continue
        value = np.asarray(net.parameters[key], dtype=np.float64)
        grad = np.zeros_like(value)
        for i in np.ndindex(*value.shape):
            step = np.zeros_like(value)
            step[i] = FD_STEP
            grad[i] = (
                cost(**{key: value + step}) - cost(**{key: value - step})
            ) / (2 * FD_STEP)
        grads[name] = grad
    return grads


def part_chain(setup: Setup, out: TextIO) -> Part:
    """Step 5: the whole algorithm on two layers with an activation."""
    _heading(out, "chain", "the whole algorithm, two layers", setup)
    net = two_layers(setup)
    print(
        "Two layers of this kind: z1 = a0 * w1 + b1, a1 = tanh(z1); "
        "z2 = a1 * w2 + b2, a2 = z2 (no activation); cost C = ½ Σ a2² "
        "(target 0).",
        file=out,
    )
    if net.first.size != setup.size:
        print(
            f"(The input is {net.first.size} wide, so that the second layer "
            "has an output.)",
            file=out,
        )
    for name, value in net.parameters.items():
        _show(out, name, value)
    values = backpropagate(net)
    print("\n1. Feed forward:", file=out)
    _side_by_side(
        out,
        {"z1": values["z1"], "a1 = tanh(z1)": values["a1"], "z2": values["z2"]},
    )
    print(
        "2. Output error: δ2 = dC/dz2 = a2 - y = z2 (no activation on the "
        "output).\n3. Backpropagate, the activation's derivative applied "
        "entry by entry:\n   δ1 = (δ2 * rot180(w2))_full ⊙ tanh'(z1), "
        "tanh'(z) = 1 - tanh(z)²",
        file=out,
    )
    _side_by_side(
        out,
        {
            "(δ2 * rot180(w2))_full": values["dC/da1"],
            "tanh'(z1)": tanh_derivative(values["z1"]),
            "δ1": values["δ1"],
        },
    )
    print(
        "4. Gradients: dC/dw = a_prev ⋆ δ and dC/db = Σ δ for each layer; "
        "δ0 = (δ1 * rot180(w1))_full is the input's delta (no activation "
        "before the input):",
        file=out,
    )
    _side_by_side(out, {k: values[k] for k in ("dC/dw2", "dC/dw1", "δ0")})
    print(
        f"  dC/db2 = Σ δ2 = {_number(values['dC/db2'])}, "
        f"dC/db1 = Σ δ1 = {_number(values['dC/db1'])}",
        file=out,
    )
    agree = _chain_agreement(out, net, values)
    panels = (
        ("z1", values["z1"], ()),
        ("(δ2 * rot180(w2))_full", values["dC/da1"], ()),
        ("tanh'(z1)", tanh_derivative(values["z1"]), ()),
        ("δ1 = product of the two", values["δ1"], ()),
        ("dC/dw1 = a0 corr δ1", values["dC/dw1"], ()),
        ("dC/dw2 = a1 corr δ2", values["dC/dw2"], ()),
    )
    return Part(agree, "Backpropagation through two layers and tanh", panels)


def _chain_agreement(out: TextIO, net: TwoLayers, values: dict) -> bool:
    """The algorithm's gradients against the reference's loops, the
    package's rules and finite differences, as a table."""
    witnesses = {
        "reference (loops)": (by_reference(net), RTOL),
        "keras_rotconv.ops": (by_rules(net), RTOL),
        "finite differences": (by_finite_differences(net), FD_RTOL),
    }
    print(
        "Largest difference from the algorithm's value, relative to its "
        "largest entry:",
        file=out,
    )
    print(f"  {'':8}" + "".join(f"{w:>20}" for w in witnesses), file=out)
    agree = True
    for name in CHAIN_GRADIENTS:
        cells = []
        for grads, tolerance in witnesses.values():
            if name not in grads:
                cells.append("-")
                continue
            difference = _relative_difference(grads[name], values[name])
            agree = agree and difference <= tolerance
            cells.append(f"{difference:.2g}")
        print(f"  {name:<8}" + "".join(f"{c:>20}" for c in cells), file=out)
    print(
        f"(Tolerance {RTOL:g}; {FD_RTOL:g} for finite differences.)",
        file=out,
    )
    print(
        "They are equal." if agree else "They DIFFER: the derivation fails.",
        file=out,
    )
    return agree


PART_FUNCTIONS = {
    "mlp": part_mlp,
    "delta": part_delta,
    "kernel": part_kernel,
    "bias": part_bias,
    "chain": part_chain,
}


def run(
    parts: Sequence[str] = PARTS,
    setup: Setup | None = None,
    plot: str | Path | None = None,
    file: TextIO | None = None,
) -> int:
    """Prints the parts; returns 0 when every part's computations agree, 1
    otherwise. With ``plot``, also writes each part's figure: to ``plot``
    for one part, to ``<stem>-<part><suffix>`` beside it for several."""
    file = file or sys.stdout
    setup = setup or Setup()
    failed = []
    for name in parts:
        part = PART_FUNCTIONS[name](setup, file)
        if not part.agree:
            failed.append(name)
        if plot is not None:
            from keras_rotconv.tools import plots

            path = Path(plot)
            if len(parts) > 1:
                path = path.with_name(f"{path.stem}-{name}{path.suffix}")
            written = plots.arrays_figure(part.panels, path, part.title)
            print(f"Figure written to {written}", file=file)
    if failed:
        print(f"\nDISAGREE: {', '.join(failed)}.", file=file)
        return 1
    print(f"\nEvery part agrees: {', '.join(parts)}.", file=file)
    return 0
