"""The kernel gradient's convolution laid out with the input's channels as
one more spatial axis.

``rules.kernel_gradient`` slides the delta over the input with the batch as
the summed channel axis, so both operands are transposed first: the input
to ``(C_in, *S, N)``, the delta to ``(*L, N, C_out)``. With one group the
input's channels can instead be an extra spatial axis, along which a window
of extent 1 slides: rows ``(1, *S, C_in, N)``, window ``(*L, 1, N,
C_out)``, one convolution of one more spatial axis. Its result is ``dC/dw``
as it stands, ``(*K, C_in, C_out)``. On torch, which convolves
channels-first, the rows are then the input's own memory, ``(1, N, *S,
C_in)``, and only the delta is copied.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras_rotconv import ops as rotconv_ops
from keras_rotconv import rules
from keras_rotconv._backend import ops  # keras.ops; on torch, see there


def applies_to_kernel_gradient(kernel_size, groups) -> bool:
    """One group (the channels of a group would pair with every group's
    deltas), and a convolution of one more axis that backends have: 1D and
    2D layers."""
    return groups == 1 and len(kernel_size) <= 2


def kernel_gradient_over_channels(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs,
    dilation: Sequence[int],
):
    """Equals ``rules.kernel_gradient`` with one group: ``dC/dw[k, i, o] =
    Σ_{n, p} x̂[n, p·stride + k·dilation, i] · delta[n, p, o]``, each input
    channel ``i`` a position of the extra axis. As in the rule, stride and
    dilation swap places and the input is read up to the last window."""
    rank = len(kernel_size)
    reads = rules.reads(x, delta, kernel_size, strides, pairs, dilation)
    # (N, *S, C_in) to (1, *S, C_in, N); (N, *L, C_out) to (*L, 1, N, C_out).
    rows = ops.expand_dims(
        ops.transpose(x, (*range(1, rank + 1), rank + 1, 0)), 0
    )
    window = ops.expand_dims(
        ops.transpose(delta, (*range(1, rank + 1), 0, rank + 1)), rank
    )
    grad = rotconv_ops.conv(
        rows,
        window,
        strides=(*dilation, 1),
        dilation=(*strides, 1),
        pairs=(*reads, (0, 0)),
    )
    return grad[0]
