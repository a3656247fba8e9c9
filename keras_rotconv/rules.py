"""The derivation, and nothing else: the backward pass of a convolution.

For one convolutional layer with input ``a_prev``, kernel ``w`` and bias
``b``, in the derivation's notation::

    forward:    z = a_prev * w + b
    delta:      delta_prev = (delta * rot180(w))_full        (input_delta)
    gradients:  dC/dw = a_prev ⋆ delta                        (kernel_gradient)
                dC/db = Σ delta                               (bias_gradient)

``*`` is the convolution a Keras conv layer computes (a cross-correlation in
signal-processing terms), ``rot180`` flips every spatial axis of the kernel
and swaps its input and output channels, ``(·)_full`` pads the delta so that
every input position a kernel tap ever touched receives its share, and ``⋆``
is a "valid" correlation. The factor ``⊙ act'(z_prev)`` belongs to the
previous layer's activation, and ordinary differentiation applies it.

A general layer adds strides ``s`` (the delta is spread back onto the
positions the outputs came from, ``spread``), dilation ``d`` (taps ``d``
apart, for the rotated kernel as for the forward one) and groups (each group
of input channels sees only its own filters).

Everything is channels-last: ``x`` (``a_prev``) is ``(N, *S, C_in)``, ``w``
is ``(*K, C_in // groups, C_out)`` and a delta is ``(N, *L, C_out)``.
``pairs`` holds the forward padding, one ``(before, after)`` per spatial
axis. Each rule is a convolution computed by ``keras_rotconv.ops.conv``, so
its own gradient (a second derivative) is again the derived one.
``keras_rotconv.forms`` holds cheaper forms of the same sums;
``keras_rotconv.textbook_rules()`` makes every layer run these instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_rotconv import ops as rotconv_ops
from keras_rotconv._backend import ops  # keras.ops; on torch, see there
from keras_rotconv._shapes import crop


def rot180(w, groups: int = 1):
    """``rot180(w)``: ``(*K, C_in/g, C_out)`` to ``(*K, C_out/g, C_in)``.

    Every spatial axis is flipped, and within each group the input and output
    channel axes trade places, so that the rotated kernel maps deltas of the
    layer's outputs back onto its inputs.
    """
    rank = len(w.shape) - 2
    *k, cin_g, cout = w.shape
    flipped = ops.flip(w, axis=tuple(range(rank)))
    per_group = ops.reshape(flipped, (*k, cin_g, groups, cout // groups))
    swapped = ops.transpose(per_group, (*range(rank), rank + 2, rank + 1, rank))
    return ops.reshape(swapped, (*k, cout // groups, groups * cin_g))


def spread(delta, strides: Sequence[int]):
    """The delta back at the positions its outputs came from: ``stride - 1``
    zeros between neighbouring entries of each axis.

    An output of length ``L`` becomes ``(L - 1) * stride + 1`` long.
    """
    for axis, s in enumerate(strides, start=1):
        if s == 1:
            continue
        shape = ops.shape(delta)
        length = shape[axis]
        # Each entry followed by s - 1 zeros on a new axis; merging the two
        # axes interleaves them. The zeros after the last entry go.
        zeros = ops.zeros_like(delta)
        entries = ops.stack([delta] + [zeros] * (s - 1), axis=axis + 1)
        merged = ops.reshape(
            entries, (*shape[:axis], length * s, *shape[axis + 1 :])
        )
        delta = crop(merged, axis, (length - 1) * s + 1)
    return delta


def full_convolution(delta, w, widths, dilation: Sequence[int], groups=1):
    """``(delta * rot180(w))`` at stride 1 and ``dilation``, the delta with
    ``widths[axis] = (before, after)`` zeros around it; ``span - 1`` on each
    side, ``span`` the dilated kernel's extent, make it the full one. A
    negative width crops instead (see ``ops.conv``)."""
    return rotconv_ops.conv(
        delta,
        rot180(w, groups),
        strides=(1,) * len(dilation),
        dilation=dilation,
        pairs=widths,
        groups=groups,
    )


def input_delta(
    delta,
    w,
    spatial_shape: Sequence[int],
    strides: Sequence[int],
    pairs,
    dilation: Sequence[int],
    groups: int = 1,
):
    """``delta_prev = (spread(delta) * rot180(w))_full``, on the layer's input.

    The spread delta gets ``span - 1`` zeros on each side and meets the
    rotated kernel at the layer's dilation, stride 1. Two corrections land
    it exactly on the layer's input: the forward padding ``pairs`` is cropped
    back off (fewer zeros on each side), and the input positions past the
    last window the stride reached (``rest``) get zeros, since no output
    depended on them.
    """
    widths = []
    for axis, s in enumerate(strides):
        span = (w.shape[axis] - 1) * dilation[axis] + 1
        before, after = pairs[axis]
        rest = 0
        if s > 1:
            # (At stride 1 the last window ends at the padded input's end.)
            length = ops.shape(delta)[axis + 1]
            reached = (length - 1) * s + span
            rest = spatial_shape[axis] + before + after - reached
        widths.append((span - 1 - before, span - 1 - after + rest))
    return full_convolution(spread(delta, strides), w, widths, dilation, groups)


def kernel_gradient(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs,
    dilation: Sequence[int],
    groups: int = 1,
):
    """``dC/dw = a_prev ⋆ delta``: ``dC/dw[k, i, o] = Σ_{n, p} a_prev[n,
    p·stride + k·dilation, i] · delta[n, p, o]``, with ``a_prev`` padded.

    One valid correlation in which the batch is the summed axis (the input's
    channels the rows, its batch their channels), the delta is the sliding
    window, and stride and dilation swap places: the delta's entries are
    ``stride`` apart on the input (convolution dilation = layer stride) and
    neighbouring taps ``dilation`` apart (convolution stride = layer
    dilation). Groups pair each group's inputs with that group's deltas.
    The input is read up to the last window (``used``), so that the result
    has ``K`` taps; a negative ``after`` crops the input's unread end.
    """
    rank = len(strides)
    n, *sizes, cin = ops.shape(x)
    # (N, *S, C_in) to (C_in/g, *S, g·N): rows, grouped as the kernel is.
    by_group = ops.reshape(x, (n, *sizes, groups, cin // groups))
    rows = ops.transpose(by_group, (rank + 2, *range(1, rank + 1), rank + 1, 0))
    rows = ops.reshape(rows, (cin // groups, *sizes, groups * n))
    # (N, *L, C_out) to (*L, N, C_out): the window.
    window = ops.transpose(delta, (*range(1, rank + 1), 0, rank + 1))
    grad = rotconv_ops.conv(
        rows,
        window,
        strides=dilation,
        dilation=strides,
        pairs=reads(x, delta, kernel_size, strides, pairs, dilation),
        groups=groups,
    )
    # (C_in/g, *K, C_out) to (*K, C_in/g, C_out)
    return ops.transpose(grad, (*range(1, rank + 1), 0, rank + 1))


def reads(x, delta, kernel_size, strides, pairs, dilation):
    """The ``(before, after)`` widths the kernel gradient's correlation
    reads of each spatial axis of ``x``: the forward padding before, and
    after it up to the last window (``used``); a negative ``after`` crops
    the input's unread end."""
    sizes = ops.shape(x)[1:-1]
    widths = []
    for axis, s in enumerate(strides):
        span = (kernel_size[axis] - 1) * dilation[axis] + 1
        used = (ops.shape(delta)[axis + 1] - 1) * s + span
        before = pairs[axis][0]
        widths.append((before, used - before - sizes[axis]))
    return widths


def bias_gradient(delta):
    """``dC/db = Σ delta`` over the batch and every spatial position.

    A float16 or bfloat16 delta is summed in float32: the sum has a term for
    every output position of every sample, and partial sums rounded to a
    half type's 11 or 8 bits lose its small terms.
    """
    axes = tuple(range(len(delta.shape) - 1))
    dtype = keras.backend.standardize_dtype(delta.dtype)
    if dtype in ("float16", "bfloat16"):
        return ops.cast(ops.sum(ops.cast(delta, "float32"), axis=axes), dtype)
    return ops.sum(delta, axis=axes)
