"""The backend seam on TensorFlow (see ``keras_rotconv._backend``)."""

from __future__ import annotations

import keras
import tensorflow as tf


def correlate(x, w, strides, dilation, groups, pairs):
    out = _convolve(x, w, strides, dilation, groups, pairs)
    if all(n is not None for n in (*x.shape, *w.shape)):
        return out
    return _reshaped(out, x, w, strides, dilation, pairs)


def _reshaped(out, x, w, strides, dilation, pairs):
    """``out`` with the shape the arithmetic gives, where sizes are known
    only when the graph runs.

    TensorFlow's oneDNN convolution (on by default on CPUs with
    AVX512_VNNI or AVX512_BF16) returns its input unchanged where the
    result is empty: an empty batch, or an input shorter than the kernel.
    Where the result is not empty, its elements are all kept and this is
    free; where it is empty, none are.
    """
    # Imported here: _shapes imports the backend seam, this module's parent.
    from keras_rotconv._shapes import at_least_zero

    rank = len(strides)
    sizes, kernel = _sizes(x), _sizes(w)
    lengths = [
        at_least_zero((n + lo + hi - (k - 1) * d - 1) // s + 1)
        for n, k, s, d, (lo, hi) in zip(
            sizes[1:-1], kernel[:rank], strides, dilation, pairs
        )
    ]
    shape = [sizes[0], *lengths, kernel[-1]]
    flat = tf.reshape(out, [-1])[: tf.reduce_prod(tf.stack(shape))]
    shaped = tf.reshape(flat, tf.stack(shape))
    shaped.set_shape([v if isinstance(v, int) else None for v in shape])
    return shaped


def _sizes(x):
    """The sizes of ``x``: ints where known as the graph is built, else
    scalar tensors (the kernel gradient's filter is a delta, whose sizes
    may be unknown too)."""
    dynamic = tf.unstack(tf.shape(x))
    return [n if n is not None else dynamic[i] for i, n in enumerate(x.shape)]


def _convolve(x, w, strides, dilation, groups, pairs):
    rank = len(strides)
    padding = _padding(x.shape, w.shape, strides, dilation, pairs)
    if padding == "EXPLICIT" and rank != 2:
        # Only the 2D convolutions take explicit padding.
        x = tf.pad(x, [(0, 0), *pairs, (0, 0)])
        padding = "VALID"
    elif padding == "EXPLICIT":
        padding = [(0, 0), *pairs, (0, 0)]
    if _depthwise(w.shape, strides, dilation, groups):
        # One input channel per group: TensorFlow's depthwise convolution
        # runs all groups as one op.
        *kernel, _, cout = w.shape
        return tf.nn.depthwise_conv2d(
            x,
            tf.reshape(w, (*kernel, groups, cout // groups)),
            strides=(1, *strides, 1),
            padding=padding,
            dilations=dilation,
        )

    def one(x, w):
        if rank == 2:
            return tf.nn.conv2d(
                x, w, strides=strides, padding=padding, dilations=dilation
            )
        return tf.nn.convolution(
            x, w, strides=strides, padding=padding, dilations=dilation
        )

    if groups == 1:
        return one(x, w)
    # Each group runs as its own convolution: TensorFlow's 3D convolution
    # has no grouped form, and its grouped 2D one measured slower on CPU
    # (benchmarks/results/README.md, "Measured figures").
    return tf.concat(
        [
            one(xg, wg)
            for xg, wg in zip(
                tf.split(x, groups, axis=-1), tf.split(w, groups, axis=-1)
            )
        ],
        axis=-1,
    )


def _depthwise(w_shape, strides, dilation, groups) -> bool:
    """Whether TensorFlow's depthwise convolution computes this grouped one:
    2D, one input channel per group, equal strides, and no stride and
    dilation together (the op's own limits)."""
    return (
        groups > 1
        and len(strides) == 2
        and w_shape[-2] == 1
        and strides[0] == strides[1]
        and (all(s == 1 for s in strides) or all(d == 1 for d in dilation))
    )


def _padding(x_shape, w_shape, strides, dilation, pairs):
    """``"VALID"`` or ``"SAME"`` where ``pairs`` are exactly that rule's
    padding, else ``"EXPLICIT"``."""
    if all(pair == (0, 0) for pair in pairs):
        return "VALID"
    for size, k, s, d, pair in zip(
        x_shape[1:-1], w_shape[:-2], strides, dilation, pairs
    ):
        if size is None:
            return "EXPLICIT"
        span = (k - 1) * d + 1
        total = max((-(-size // s) - 1) * s + span - size, 0)
        if pair != (total // 2, total - total // 2):
            return "EXPLICIT"
    return "SAME"


def custom_gradient(forward, backward):
    @tf.custom_gradient
    def op(*tensors):
        def grad(upstream):
            return backward(upstream, *tensors, needed=(True,) * len(tensors))

        return forward(*tensors), grad

    return op


def pad(x, widths):
    return keras.ops.pad(x, widths)


def add_bias(z, b):
    # TensorFlow's graph optimizer fuses a BiasAdd into the convolution
    # before it; an AddV2 it leaves as a separate pass over ``z``.
    return tf.nn.bias_add(z, b)


def after(x, *earlier):
    """See ``_backend.after``: ``x`` read only once ``earlier`` exist."""
    if tf.executing_eagerly():
        return x
    with tf.control_dependencies(earlier):
        return tf.identity(x)


def shared_filter(w):
    return w


def runs_groups_apart(w_shape, strides, dilation, groups) -> bool:
    # Outside its depthwise op, each group runs as its own convolution.
    return groups > 1 and not _depthwise(w_shape, strides, dilation, groups)


def sums_depthwise_taps() -> bool:
    # A graph runs the taps side by side, each with its own products, and
    # XLA took longer; one convolution per group runs fast.
    return False


def pads_by_copy(rank: int) -> bool:
    # Only the 2D convolutions take explicit padding.
    return rank != 2


def transposed_product(a, b):
    return tf.matmul(a, b, transpose_a=True)


def product(a, b):
    return tf.matmul(a, b)


def device_kind(x):
    return tf.DeviceSpec.from_string(x.device or "").device_type or ""


def times_forms() -> bool:
    # Not while XLA compiles the step (jit_compile=True): it lays out and
    # schedules the forms its own way, and with the tap products its
    # step's peak memory rose to 1.8-3.3 times Conv2D's (the convolution:
    # 1.00; benchmarks/results/README.md). tf.__internal__ is the API
    # TensorFlow exports for Keras; without it, forms are timed.
    enclosing = getattr(tf.__internal__, "get_enclosing_xla_context", None)
    return enclosing is None or enclosing() is None


def time_forms(forms, shapes, dtype):
    # Imported here: the seam's package imports this module.
    from keras_rotconv._backend import _least_seconds

    with tf.init_scope():  # eager, even while a tf.function is traced
        tensors = [tf.random.normal(shape, dtype=dtype) for shape in shapes]
        functions = [tf.function(form, autograph=False) for form in forms]
        calls = [(lambda f=f: f(*tensors).numpy()) for f in functions]
        return _least_seconds(calls)


def traced_by_torch_compile() -> bool:
    return False
