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

from keras import ops

from keras_rotconv import _backend
from keras_rotconv._shapes import (
    added_zeros,
    at_least_zero,
    crop_negative,
    is_zero,
    pad,
)


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
    axes = tuple(range(rank + 1))
    taps = []
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
        taps.append(ops.sum(window * delta, axis=axes))
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
    padded = _padded(x, pairs)
    cin, cout = x.shape[-1], delta.shape[-1]
    lengths = ops.shape(delta)[1:-1]
    deltas = ops.reshape(delta, (-1, cout))
    taps = []
    for tap in itertools.product(*map(range, kernel_size)):
        window = _in_turn(padded, taps)[
            (
                slice(None),
                *(
                    slice(k * d, k * d + (length - 1) * s + 1, s)
                    for k, d, s, length in zip(tap, dilation, strides, lengths)
                ),
            )
        ]
        taps.append(_product(ops.reshape(window, (-1, cin)), deltas))
    return ops.reshape(ops.stack(taps), (*kernel_size, cin, cout))


def is_flat(strides, dilation) -> bool:
    """Whether ``kernel_gradient_by_flat_taps`` applies: no axis both
    strided and dilated (Keras refuses them together)."""
    return all(s == 1 or d == 1 for s, d in zip(strides, dilation))


def kernel_gradient_by_flat_taps(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs,
    dilation: Sequence[int],
):
    """``kernel_gradient_by_taps`` with each tap's window a plain range of
    rows: no copy at stride 1, one (the phase split) otherwise.

    Split each strided axis of the padded input into its ``s`` phases:
    tap ``k = j·s + r`` reads position ``p·s + k = (p + j)·s + r``, position
    ``p + j`` of phase ``r`` (``p + k·dilation`` of the one phase at stride
    1). Flatten each phase ``(N, *M, C)`` to rows ``(N·∏M, C)``, ``M`` the
    delta's ``L`` plus the farthest tap: position ``p + j`` of sample ``n``
    is row ``q + offset(j)``, where ``q`` is the row of ``p``. Place the
    delta in the same frame, zeros after each axis's ``L`` positions. Then
    tap ``k``'s product runs over the rows ``q`` of the delta and ``q +
    offset(j)`` of phase ``r``, both plain ranges: a row ``q`` outside the
    delta's positions meets a zero, and one inside reads within its own
    sample. The frame's zeros cost extra products, ``∏M / ∏L`` times as
    many.
    """
    padded = _padded(x, pairs)
    n, *sizes, cin = ops.shape(padded)
    cout = delta.shape[-1]
    lengths = ops.shape(delta)[1:-1]
    # Per axis: the step between taps within a phase, the taps per phase,
    # and the frame M.
    gaps = [d if s == 1 else 1 for s, d in zip(strides, dilation)]
    counts = [-(-k // s) for k, s in zip(kernel_size, strides)]
    frame = [
        length + (t - 1) * gap for length, t, gap in zip(lengths, counts, gaps)
    ]
    # The padded input cut or padded to the phases' frames, then split.
    padded = pad(
        crop_negative(
            padded,
            [(0, m * s - size) for m, s, size in zip(frame, strides, sizes)],
        ),
        [(0, 0), *((0, at_least_zero(m * s - size))
                   for m, s, size in zip(frame, strides, sizes)), (0, 0)],
    )  # fmt: skip
    rows = _phase_rows(padded, frame, strides)
    framed = pad(
        delta,
        [(0, 0), *((0, m - length) for m, length in zip(frame, lengths)),
         (0, 0)],
    )  # fmt: skip
    # Row steps of each spatial axis within one sample.
    steps = [math.prod(frame[axis + 1 :]) for axis in range(len(frame))]
    span = sum((t - 1) * g * step for t, g, step in zip(counts, gaps, steps))
    per_phase = n * math.prod(frame)
    count = per_phase - span
    deltas = ops.reshape(framed, (-1, cout))[:count]
    taps = []
    for tap in itertools.product(*map(range, kernel_size)):
        phase = 0
        for k, s in zip(tap, strides):
            phase = phase * s + k % s
        start = phase * per_phase + sum(
            (k // s) * g * step
            for k, s, g, step in zip(tap, strides, gaps, steps)
        )
        # A range of the leading axis: a view, where the backend can.
        window = _in_turn(rows, taps)[start : start + count]
        taps.append(_product(window, deltas))
    return ops.reshape(ops.stack(taps), (*kernel_size, cin, cout))


def _phase_rows(x, frame, strides):
    """``(N, *(M·s), C)`` to rows ``(∏s · N·∏M, C)``: phase ``r`` (in
    ``itertools.product`` order) is the ``r``-th block of ``N·∏M`` rows,
    positions ``m·s + r`` flattened."""
    n, *_, c = ops.shape(x)
    if all(s == 1 for s in strides):
        return ops.reshape(x, (-1, c))
    rank = len(strides)
    split = ops.reshape(
        x, (n, *(v for m, s in zip(frame, strides) for v in (m, s)), c)
    )
    order = (
        *range(2, 2 * rank + 1, 2),
        0,
        *range(1, 2 * rank, 2),
        2 * rank + 1,
    )
    return ops.reshape(ops.transpose(split, order), (-1, c))


def _in_turn(x, taps):
    """``x``, read once the last tap's product exists (see
    ``_backend.after``): a graph would otherwise take every tap's window at
    once, and where a window is a copy, hold them all."""
    return _backend.after(x, taps[-1]) if taps else x


def _padded(x, pairs):
    """``x`` with the forward padding written out (negative widths crop)."""
    return pad(crop_negative(x, pairs), [(0, 0), *added_zeros(pairs), (0, 0)])


def _product(rows, deltas):
    """``rowsᵀ · deltas``: ``(M, C_in)`` and ``(M, C_out)`` to ``(C_in,
    C_out)`` (see ``_backend.transposed_product``)."""
    return _backend.transposed_product(rows, deltas)
