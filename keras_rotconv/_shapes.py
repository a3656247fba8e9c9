"""Padding widths and slices, for sizes known now or only when a graph runs.

A size is an int, a scalar tensor (TensorFlow, an axis whose length is known
only when the graph runs) or a symbolic int (``torch.compile`` with dynamic
shapes), which compares like an int and must stay one. These helpers take
all three.
"""

from __future__ import annotations

from keras import ops

from keras_rotconv import _backend


def at_least_zero(value):
    """``max(value, 0)`` for an int, a symbolic int or a scalar tensor."""
    if ops.is_tensor(value):
        return ops.maximum(value, 0)
    return max(value, 0)


def is_zero(value) -> bool:
    """Whether ``value`` is known, now, to be zero."""
    return isinstance(value, int) and value == 0


def pad(x, widths):
    """``x`` with ``widths[axis] = (before, after)`` zeros added, written
    out (see ``_backend.pad``)."""
    if all(is_zero(v) for pair in widths for v in pair):
        return x
    return _backend.pad(x, widths)


def added_zeros(widths):
    """The zeros that ``(before, after)`` padding widths add; a negative
    width adds none (``crop_negative`` cuts those positions off)."""
    return [(at_least_zero(lo), at_least_zero(hi)) for lo, hi in widths]


def crop_negative(x, widths):
    """``x`` with ``-width`` entries cut from each spatial side whose padding
    width is negative."""
    for axis, (lo, hi) in enumerate(widths, start=1):
        cut_lo, cut_hi = at_least_zero(-lo), at_least_zero(-hi)
        if is_zero(cut_lo) and is_zero(cut_hi):
            continue
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(cut_lo, ops.shape(x)[axis] - cut_hi)
        x = x[tuple(index)]
    return x


def pad_spatial(x, widths):
    """``x`` with ``widths[axis] = (before, after)`` zeros written out on
    each spatial axis, or ``-width`` entries cut off where negative."""
    return pad(crop_negative(x, widths), [(0, 0), *added_zeros(widths), (0, 0)])


def tap_slices(tap, strides, dilation, lengths):
    """The spatial slices of a padded input that kernel tap ``tap`` reads:
    the positions ``p·stride + k·dilation`` for each of the output's
    ``lengths``."""
    return tuple(
        slice(k * d, k * d + (length - 1) * s + 1, s)
        for k, d, s, length in zip(tap, dilation, strides, lengths)
    )


def crop(x, axis, length):
    """Keep the first ``length`` entries of ``axis``."""
    return window(x, axis, 0, length)


def window(x, axis, start, length):
    """Keep the entries ``start`` to ``start + length`` of ``axis``."""
    if is_zero(start) and isinstance(length, int) and x.shape[axis] == length:
        return x
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, start + length)
    return x[tuple(index)]


def at_least_one_sample(x, delta):
    """``x`` and ``delta`` with one zero sample added if the batch is empty.

    The kernel gradient of an empty batch is a sum of no terms, zero; but as
    a convolution the batch is the channel axis, and no backend convolves
    zero channels. A zero sample adds nothing to the sum. The batch size may
    only be known when a graph runs (tf.distribute hands a replica an empty
    share of a last, partial batch), so the sample count is computed rather
    than branched on: XLA compiles both sides of a branch, and compiling the
    empty side crashes it.
    """
    batch = ops.shape(x)[0]
    if isinstance(batch, int) and batch > 0:
        return x, delta
    widths = [(0, at_least_zero(1 - batch))] + [(0, 0)] * (len(x.shape) - 1)
    return pad(x, widths), pad(delta, widths)


def at_least_one_position(delta):
    """``delta`` with one zero position added at the end of every spatial
    axis that is empty.

    The kernel gradient of an empty output is again a sum of no terms; but
    the delta is the convolution's filter, and no backend convolves with an
    empty filter. The added position reads input positions past the end,
    which the kernel gradient pads with zeros as for any delta; and it adds
    nothing. An output can only be empty where the layer could not check the
    sizes (they are known only when a graph runs), so the widths are
    computed, as in ``at_least_one_sample``.
    """
    lengths = ops.shape(delta)[1:-1]
    if all(isinstance(length, int) and length > 0 for length in lengths):
        return delta
    widths = [(0, at_least_zero(1 - length)) for length in lengths]
    return pad(delta, [(0, 0), *widths, (0, 0)])
