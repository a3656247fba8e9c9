"""The derivation counted out index by index, in plain NumPy loops.

One convolutional layer with its activation, for any number of spatial axes,
channels-last::

    z[n, p, o]       = Σ_{k, i} a_prev[n, p·s + k·d - pad, g(o)·I + i]
                                 · w[k, i, o] + b[o]
    a                = act(z)

where ``p`` runs over output positions, ``k`` over kernel taps, ``i`` over
the ``I = C_in / groups`` input channels of output channel ``o``'s group
``g(o)``, and positions outside the input read as zero (padding).

The chain rule, one term at a time: ``z[n, p, o]`` depends on
``a_prev[n, q, c]`` exactly when ``q = p·s + k·d - pad`` for some tap ``k``
and ``c`` is in ``o``'s group, with partial derivative ``w[k, c - g(o)·I, o]``.
So::

    dC/da_prev[n, q, c] = Σ over (p, k, o) with p·s + k·d - pad = q
                              of delta[n, p, o] · w[k, c - g(o)·I, o]
    dC/dw[k, i, o]      = Σ_{n, p} a_prev[n, p·s + k·d - pad, g(o)·I + i]
                              · delta[n, p, o]
    dC/db[o]            = Σ_{n, p} delta[n, p, o]

with ``delta = dC/dz``. Multiplying ``dC/da_prev`` by ``act'(z_prev)`` gives
the previous layer's delta. ``keras_rotconv.ops`` computes the same numbers
as whole convolutions (the full convolution with the rotated kernel, and a
valid correlation); this module is kept as loops so that each sum can be
read off and checked, and serves the tests as an independent oracle. It is
slow: use it on small inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np


def pads(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    padding: str,
) -> list[int]:
    """Zeros added before each spatial axis: none for ``"valid"``; for
    ``"same"``, half of what makes ``ceil(size / stride)`` outputs (rounded
    down); for ``"causal"``, the dilated kernel's extent minus one."""
    before = []
    for size, k, s, d in zip(spatial_shape, kernel_size, strides, dilation):
        extent = (k - 1) * d + 1
        if padding == "valid":
            before.append(0)
        elif padding == "causal":
            before.append(extent - 1)
        else:
            outputs = -(-size // s)
            before.append(max((outputs - 1) * s + extent - size, 0) // 2)
    return before


def output_shape(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    padding: str,
) -> list[int]:
    """Output positions per spatial axis."""
    if padding == "same":
        return [-(-size // s) for size, s in zip(spatial_shape, strides)]
    shape = []
    for size, k, s, d, pad in zip(
        spatial_shape,
        kernel_size,
        strides,
        dilation,
        pads(spatial_shape, kernel_size, strides, dilation, padding),
    ):
        shape.append((size + pad - (k - 1) * d - 1) // s + 1)
    return shape


def _taps(a_shape, w_shape, strides, dilation, padding):
    """Every (output position p, kernel tap k, input position q) with
    q = p·s + k·d - pad inside the input: the pairs the forward sum links."""
    spatial, kernel = a_shape[1:-1], w_shape[:-2]
    before = pads(spatial, kernel, strides, dilation, padding)
    out = output_shape(spatial, kernel, strides, dilation, padding)
    for p in itertools.product(*(range(n) for n in out)):
        for k in itertools.product(*(range(n) for n in kernel)):
            q = tuple(
                pi * s + ki * d - b
                for pi, ki, s, d, b in zip(p, k, strides, dilation, before)
            )
            if all(0 <= qi < n for qi, n in zip(q, spatial)):
                yield p, k, q


def forward(a_prev, w, b, strides, dilation, padding, groups=1):
    """``z = a_prev * w + b``, one multiply-add at a time."""
    n_batch, c_in, c_out = a_prev.shape[0], a_prev.shape[-1], w.shape[-1]
    per_group_in, per_group_out = c_in // groups, c_out // groups
    out = output_shape(
        a_prev.shape[1:-1], w.shape[:-2], strides, dilation, padding
    )
    z = np.zeros((n_batch, *out, c_out), dtype=np.float64)
    for p, k, q in _taps(a_prev.shape, w.shape, strides, dilation, padding):
        for n in range(n_batch):
            for o in range(c_out):
                first = (o // per_group_out) * per_group_in
                for i in range(per_group_in):
                    z[(n, *p, o)] += a_prev[(n, *q, first + i)] * w[(*k, i, o)]
    if b is not None:
        z += b
    return z


def input_gradient(delta, w, a_shape, strides, dilation, padding, groups=1):
    """``dC/da_prev``: each input position collects ``delta · w`` from every
    output and tap that read it."""
    c_in, c_out = a_shape[-1], w.shape[-1]
    per_group_in, per_group_out = c_in // groups, c_out // groups
    grad = np.zeros(a_shape, dtype=np.float64)
    for p, k, q in _taps(a_shape, w.shape, strides, dilation, padding):
        for n in range(a_shape[0]):
            for o in range(c_out):
                first = (o // per_group_out) * per_group_in
                for i in range(per_group_in):
                    grad[(n, *q, first + i)] += (
                        delta[(n, *p, o)] * w[(*k, i, o)]
                    )
    return grad


def kernel_gradient(
    a_prev, delta, w_shape, strides, dilation, padding, groups=1
):
    """``dC/dw``: each tap collects ``a_prev · delta`` over the batch and
    every output position."""
    c_in, c_out = a_prev.shape[-1], w_shape[-1]
    per_group_in, per_group_out = c_in // groups, c_out // groups
    grad = np.zeros(w_shape, dtype=np.float64)
    for p, k, q in _taps(a_prev.shape, w_shape, strides, dilation, padding):
        for n in range(a_prev.shape[0]):
            for o in range(c_out):
                first = (o // per_group_out) * per_group_in
                for i in range(per_group_in):
                    grad[(*k, i, o)] += (
                        a_prev[(n, *q, first + i)] * delta[(n, *p, o)]
                    )
    return grad


def bias_gradient(delta):
    """``dC/db = Σ delta`` over the batch and every output position."""
    grad = np.zeros(delta.shape[-1], dtype=np.float64)
    for index in np.ndindex(*delta.shape):
        grad[index[-1]] += delta[index]
    return grad


def layer_backward(
    a_prev,
    w,
    b,
    upstream,
    act_derivative: Callable[[np.ndarray], np.ndarray],
    z_prev=None,
    prev_act_derivative: Callable[[np.ndarray], np.ndarray] | None = None,
    strides=None,
    dilation=None,
    padding="valid",
    groups=1,
):
    """The whole layer rule for ``a = act(a_prev * w + b)``.

    ``upstream`` is ``dC/da``; ``act_derivative`` maps ``z`` to ``act'(z)``.
    Returns ``(delta_prev, dC/dw, dC/db)``, where ``delta_prev`` is
    ``dC/da_prev``, times ``prev_act_derivative(z_prev)`` when the previous
    layer's pre-activation ``z_prev`` is given.
    """
    rank = a_prev.ndim - 2
    strides = strides or (1,) * rank
    dilation = dilation or (1,) * rank
    z = forward(a_prev, w, b, strides, dilation, padding, groups)
    delta = upstream * act_derivative(z)
    delta_prev = input_gradient(
        delta, w, a_prev.shape, strides, dilation, padding, groups
    )
    if z_prev is not None:
        delta_prev = delta_prev * prev_act_derivative(z_prev)
    return (
        delta_prev,
        kernel_gradient(
            a_prev, delta, w.shape, strides, dilation, padding, groups
        ),
        bias_gradient(delta),
    )
