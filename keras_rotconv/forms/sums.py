"""Kernel gradients whose correlation is a plain sum of products.

``rules.kernel_gradient`` is one convolution whose window is the delta. Where
that window meets only one tap (a 1x1 kernel) or only one input channel per
group (a depthwise kernel), the same sums are cheaper written out: one matrix
product, or one sum of products per tap. Any kernel's gradient is one matrix
product per tap (``kernel_gradient_by_taps``), which some backends run faster
than the convolution (``keras_rotconv.ops`` times them). They are
differentiated as the sums they are, not by the derived rules.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from keras_rotconv import _backend
from keras_rotconv._backend import ops  # keras.ops; on torch, see there
from keras_rotconv._shapes import is_zero, pad, pad_spatial, tap_slices


def is_pointwise(kernel_size, strides, pairs) -> bool:
    """Whether ``kernel_gradient_pointwise`` applies: a 1x1 kernel at stride
    1 with no padding."""
    return (
        all(k == 1 for k in kernel_size)
        and all(s == 1 for s in strides)
        and all(is_zero(v) for pair in pairs for v in pair)
    )


def is_depthwise(x, strides, groups) -> bool:
    """Whether ``kernel_gradient_depthwise`` applies: one input channel per
    group, stride 1."""
    return groups > 1 and x.shape[-1] == groups and all(s == 1 for s in strides)


def kernel_gradient_pointwise(x, delta, groups: int = 1):
    """Equals ``rules.kernel_gradient`` of a 1x1 kernel at stride 1, with no
    padding: the one tap's window is the whole input, so ``dC/dw[0, i, o] =
    Σ_{n, p} a_prev[n, p, i] · delta[n, p, o]`` is one matrix product over
    the positions ``(n, p)`` (per group), with no layout change of either
    operand."""
    rank = len(x.shape) - 2
    cin, cout = x.shape[-1], delta.shape[-1]
    if groups == 1:
        grad = ops.einsum(
            "mi,mo->io",
            ops.reshape(x, (-1, cin)),
            ops.reshape(delta, (-1, cout)),
        )
    else:
        grad = ops.einsum(
            "mgi,mgo->igo",
            ops.reshape(x, (-1, groups, cin // groups)),
            ops.reshape(delta, (-1, groups, cout // groups)),
        )
    return ops.reshape(grad, (*(1,) * rank, cin // groups, cout))


def kernel_gradient_depthwise(
    x, delta, kernel_size: Sequence[int], pairs, dilation: Sequence[int]
):
    """Equals ``rules.kernel_gradient`` of a depthwise kernel (one input
    channel per group, ``m`` filters each) at stride 1: each group's
    correlation has a single input channel, so tap ``k``'s gradient,
    ``dC/dw[k, 0, c·m + j] = Σ_{n, p} a_prev[n, p + k·dilation, c] ·
    delta[n, p, c·m + j]``, is the products of one window of the padded
    input with the delta, summed. (As a convolution it is a grouped one
    whose filter, the delta, is as large as the image.) Float16 and
    bfloat16 are summed in float32 on JAX and torch; a test checks it.
    """
    rank = len(kernel_size)
    x, delta = ops.convert_to_tensor(x), ops.convert_to_tensor(delta)
    n, *lengths, cout = ops.shape(delta)
    cin = x.shape[-1]
    padded = pad(x, [(0, 0), *pairs, (0, 0)])
    multiplier = cout // cin
    if multiplier > 1:
        # (N, *L, C, m): each input channel's m deltas.
        delta = ops.reshape(delta, (n, *lengths, cin, multiplier))
    windows = []
    for tap in itertools.product(*map(range, kernel_size)):
        # One slice for all axes: a backend may copy each slice it takes.
        window = padded[
            (
                slice(None),
                *(
                    slice(k * d, k * d + length)
                    for k, d, length in zip(tap, dilation, lengths)
                ),
            )
        ]
        if multiplier > 1:
            window = ops.expand_dims(window, -1)
        windows.append(window)
    taps = _backend.summed_products(windows, delta, rank + 1)
    return ops.reshape(ops.stack(taps), (*kernel_size, 1, cout))


def kernel_gradient_by_taps(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs,
    dilation: Sequence[int],
):
    """Equals ``rules.kernel_gradient`` (one group): tap ``k`` reads the
    padded input's window ``x̂[n, p·stride + k·dilation]`` at every output
    position ``p``, so ``dC/dw[k, i, o] = Σ_{n, p} x̂[n, p·stride +
    k·dilation, i] · delta[n, p, o]`` is one matrix product of that window,
    the positions ``(n, p)`` its rows, with the delta. One product per tap;
    the window is a strided slice."""
    padded = pad_spatial(x, pairs)
    cin, cout = x.shape[-1], delta.shape[-1]
    lengths = ops.shape(delta)[1:-1]
    deltas = ops.reshape(delta, (-1, cout))
    taps = []
    for tap in itertools.product(*map(range, kernel_size)):
        window = _in_turn(padded, taps)[
            (slice(None), *tap_slices(tap, strides, dilation, lengths))
        ]
        taps.append(_product(ops.reshape(window, (-1, cin)), deltas))
    return ops.reshape(ops.stack(taps), (*kernel_size, cin, cout))


def is_flat(x, delta, kernel_size, strides, pairs, dilation) -> bool:
    """Whether ``kernel_gradient_by_flat_taps`` applies: stride 1, and the
    delta has one position per window of the padded input (not the zero
    position ``_shapes.at_least_one_position`` gives an empty output).
    (With a stride, splitting the input into phases first would make the
    windows ranges again, but that split is one more copy of the input,
    which raised a train step's peak memory: benchmarks/results/README.md.)
    """
    return all(s == 1 for s in strides) and all(
        size + before + after - (k - 1) * d == length
        for size, length, k, d, (before, after) in zip(
            x.shape[1:-1], delta.shape[1:-1], kernel_size, dilation, pairs
        )
    )


def kernel_gradient_by_flat_taps(
    x, delta, kernel_size: Sequence[int], pairs, dilation: Sequence[int]
):
    """``kernel_gradient_by_taps`` at stride 1, each tap's window a plain
    range of rows, no copy.

    Flatten the padded input ``(N, *P, C)`` to rows ``(N·∏P, C)``:
    position ``p + k·dilation`` of sample ``n`` is row ``q + offset(k)``,
    where ``q`` is the row of ``p``. Place the delta in the same frame,
    zeros after each axis's ``L`` positions. Then tap ``k``'s product runs
    over the rows ``q`` of the delta and ``q + offset(k)`` of the input,
    both plain ranges: a row ``q`` outside the delta's positions meets a
    zero, and one inside reads within its own sample (``p + k·dilation <
    P`` at stride 1). The frame's zeros cost extra products, ``∏P / ∏L``
    times as many.
    """
    padded = pad_spatial(x, pairs)
    n, *sizes, cin = ops.shape(padded)
    cout = delta.shape[-1]
    lengths = ops.shape(delta)[1:-1]
    framed = pad(
        delta,
        [(0, 0), *((0, size - length) for size, length in zip(sizes, lengths)),
         (0, 0)],
    )  # fmt: skip
    # Row steps of each spatial axis within one sample.
    steps = [math.prod(sizes[axis + 1 :]) for axis in range(len(sizes))]
    span = sum(
        (k - 1) * d * step for k, d, step in zip(kernel_size, dilation, steps)
    )
    count = n * math.prod(sizes) - span
    rows = ops.reshape(padded, (-1, cin))
    deltas = ops.reshape(framed, (-1, cout))[:count]
    taps = []
    for tap in itertools.product(*map(range, kernel_size)):
        start = sum(k * d * step for k, d, step in zip(tap, dilation, steps))
        # A range of the leading axis: a view, where the backend can.
        window = _in_turn(rows, taps)[start : start + count]
        taps.append(_product(window, deltas))
    return ops.reshape(ops.stack(taps), (*kernel_size, cin, cout))


def is_narrow(x, delta, kernel_size) -> bool:
    """Whether ``kernel_gradient_by_rows`` applies within the delta's
    memory: its matrix, ``∏K·C_in`` rows as long as the delta's positions,
    holds no more entries than the delta (``C_out`` per position), as at
    a first layer (one to three input channels)."""
    return math.prod(kernel_size) * x.shape[-1] <= delta.shape[-1]


def kernel_gradient_by_rows(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs,
    dilation: Sequence[int],
):
    """``kernel_gradient_by_taps`` as one matrix product: each tap's window
    of every input channel is a row (``(n, p)`` along it), the rows of all
    taps one matrix ``(∏K·C_in, N·∏L)``, times the delta ``(N·∏L,
    C_out)``. Copies the windows once (the matrix); one product, with the
    positions as the summed axis of a row-major matrix, is faster than a
    product per tap where ``C_in`` is small (benchmarks/results/README.md).
    """
    # The matrix is ∏K times the input: made from the input once the delta
    # exists, or a graph makes it during the forward pass and holds it.
    # (A copy as large as the input is better made early, as the other
    # forms' are: the input is then freed, rather than held beside it.)
    padded = pad_spatial(_backend.after(x, delta), pairs)
    rank = len(kernel_size)
    # (C_in, N, *P): each channel's positions in a row.
    channels = ops.transpose(padded, (rank + 1, *range(rank + 1)))
    cin, cout = x.shape[-1], delta.shape[-1]
    lengths = ops.shape(delta)[1:-1]
    windows = [
        channels[
            (
                slice(None),
                slice(None),
                *tap_slices(tap, strides, dilation, lengths),
            )
        ]
        for tap in itertools.product(*map(range, kernel_size))
    ]
    rows = ops.reshape(ops.stack(windows), (len(windows) * cin, -1))
    grad = _backend.product(rows, ops.reshape(delta, (-1, cout)))
    return ops.reshape(grad, (*kernel_size, cin, cout))


def _in_turn(x, taps):
    """``x``, read once the last tap's product exists (see
    ``_backend.after``): a graph would otherwise take every tap's window at
    once, and where a window is a copy, hold them all."""
    return _backend.after(x, taps[-1]) if taps else x


def _product(rows, deltas):
    """``rowsᵀ · deltas``: ``(M, C_in)`` and ``(M, C_out)`` to ``(C_in,
    C_out)`` (see ``_backend.transposed_product``)."""
    return _backend.transposed_product(rows, deltas)
