"""The transposed convolution, computed and differentiated by the derived
rules.

A transposed convolution is the input delta of an ordinary one: for the
convolution ``z = a * w`` from an input of length ``O`` to an output of
length ``L`` (padding ``(before, after)``, stride ``s``, dilation ``d``),
the transposed convolution of ``x`` (length ``L``) is::

    y = (spread(x) * rot180(w))_full, cropped to O      = input_delta(x, w)

with the kernel in Keras's transposed layout ``(*K, filters, C_in)``, which
is the ordinary convolution's ``(*K, C_in, C_out)`` read the other way. Its
backward pass is the derivation read the same way round:

    dC/dx = g * w                 the forward correlation (``ops.conv``)
    dC/dw = g ⋆ x                 the valid correlation, the upstream ``g``
                                  as the "input", ``x`` as the "delta"
                                  (``ops.kernel_gradient``)
    dC/db = Σ g                   (``ops.bias_gradient``)

``transpose_geometry`` turns Keras's ``padding`` and ``output_padding`` into
that ordinary convolution's ``O`` and ``(before, after)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from keras import ops

from keras_rotconv import _backend
from keras_rotconv import ops as rotconv_ops


class TransposeAxis(NamedTuple):
    """One spatial axis of a transposed convolution: ``length`` is its
    output's length ``O``, ``pair`` the ``(before, after)`` padding of the
    ordinary convolution from ``O`` positions back to the input's ``L``."""

    length: object
    pair: tuple[int, int]


def transpose_geometry(
    length,
    kernel_size: int,
    stride: int,
    dilation: int,
    padding: str,
    output_padding: int | None,
) -> TransposeAxis:
    """Keras's output length of a transposed convolution, and the padding
    that makes it the input delta of a convolution.

    Keras's rule (every backend; ``span`` is the dilated kernel's extent)::

        valid:               O = (L - 1)·s + span + output_padding,
                             output_padding by default max(span, s) - span
        same, no o.p.:       O = L·s
        same, with o.p.:     O = (L - 1)·s + span % 2 + output_padding

    The full convolution of the spread input then pads it with ``left``
    zeros before (Keras's JAX and torch backends compute the same
    ``left``): ``span - 1`` for valid, for same ``ceil(p / 2)`` of the total
    ``p = O - (L - 1)·s + span - 2``, at most ``span - 1``. A full
    convolution that pads ``left`` zeros before is the input delta of a
    convolution padded ``before = span - 1 - left``; ``after`` is what makes
    that convolution give back exactly ``L`` positions, never negative (the
    positions it leaves out are ones no input reached: output padding).
    ``length`` may be a tensor (a size known only when the graph runs);
    the padding never depends on it.
    """
    span = rotconv_ops.effective_kernel_size(kernel_size, dilation)
    if padding == "valid":
        if output_padding is None:
            output_padding = max(span, stride) - span
        # O - (L - 1)·s, the same for every L.
        extra = span + output_padding
        left = span - 1
    elif padding == "same":
        extra = stride if output_padding is None else span % 2 + output_padding
        left = min(-(-(extra + span - 2) // 2), span - 1)
    else:
        raise ValueError(
            "Invalid value for argument `padding`. Expected 'valid' or "
            f"'same'. Received: padding={padding}"
        )
    before = span - 1 - left
    # The convolution's last window, from (L - 1)·s - before, ends at
    # (L - 1)·s + span - before: `after` zeros past O's end.
    after = max(span - before - extra, 0)
    return TransposeAxis((length - 1) * stride + extra, (before, after))


def conv_transpose(
    x,
    w,
    b=None,
    *,
    strides: Sequence[int],
    dilation: Sequence[int],
    padding: str,
    output_padding: Sequence[int] | None = None,
):
    """``y = input_delta(x, w) + b``: the transposed convolution of a
    channels-last ``x`` ``(N, *L, C_in)`` with a kernel ``(*K, filters,
    C_in)`` (Keras's layout), ``(N, *O, filters)``, differentiated by the
    derived rules (see the module docstring).

    ``padding`` is ``"valid"`` or ``"same"``, ``output_padding`` None or one
    entry per spatial axis, both as Keras reads them.
    """
    x, w = ops.convert_to_tensor(x), ops.convert_to_tensor(w)
    b = None if b is None else ops.convert_to_tensor(b)
    rank = len(strides)
    strides, dilation = tuple(strides), tuple(dilation)
    kernel_size = tuple(w.shape[:rank])
    paddings = output_padding or (None,) * rank
    axes = [
        transpose_geometry(length, k, s, d, padding, p)
        for length, k, s, d, p in zip(
            ops.shape(x)[1:-1], kernel_size, strides, dilation, paddings
        )
    ]
    out_shape = tuple(axis.length for axis in axes)
    pairs = tuple(axis.pair for axis in axes)

    def forward(x, w, *bias):
        y = rotconv_ops.input_delta(x, w, out_shape, strides, pairs, dilation)
        return y + bias[0] if bias else y

    def backward(upstream, x, w, *bias, needed):
        dx = dw = db = None
        if needed[1]:
            # The roles of the ordinary convolution's kernel gradient with
            # input and delta swapped: the upstream is the "input" here.
            dw = rotconv_ops.kernel_gradient(
                upstream, x, kernel_size, strides, pairs, dilation
            )
        if needed[0]:
            dx = rotconv_ops.conv(
                upstream, w, strides=strides, dilation=dilation, pairs=pairs
            )
        if not bias:
            return dx, dw
        if needed[2]:
            db = rotconv_ops.bias_gradient(upstream)
        return dx, dw, db

    args = (x, w) if b is None else (x, w, b)
    return _backend.custom_gradient(forward, backward)(*args)
