"""The backend seam: what the derivation cannot say in ``keras.ops``.

``correlate`` is a plain strided, dilated, grouped convolution of a
zero-padded input in channels-last layout, the forward primitive every rule
in ``ops`` is built from; ``add_bias`` adds the bias. ``custom_gradient``
attaches a backward function to a forward one using the backend's own
mechanism. ``pad`` is zero padding. The formulas themselves live in ``ops``
and are written once; what differs here is only how each backend computes
the same values fastest (padding read by the convolution rather than
written out, TensorFlow's depthwise and bias-add ops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras

_BACKEND = keras.backend.backend()


def correlate(
    x,
    w,
    strides: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    pairs: Sequence[tuple] | None = None,
):
    """``out[n, p, o] = Σ_{k, i} x̂[n, p·strides + k·dilation, i] w[k, i, o]``,
    each group of channels on its own, where ``x̂`` is ``x`` with
    ``pairs[axis] = (before, after)`` zeros added to each spatial axis (none
    by default).

    ``x`` is ``(N, *S, C_in)``, ``w`` is ``(*K, C_in // groups, C_out)``.
    Where the backend's convolution can pad as it reads, the padded copy of
    ``x`` is never written out.
    """
    rank = len(strides)
    pairs = tuple(pairs) if pairs is not None else ((0, 0),) * rank
    if not _static(pairs):
        x = pad(x, [(0, 0), *pairs, (0, 0)])
        pairs = ((0, 0),) * rank
    empty = _empty_result(x, w, strides, dilation, pairs)
    if empty is not None:
        return keras.ops.zeros(empty, dtype=x.dtype)
    one_window = _one_window_unstrided(x, w, strides, dilation, pairs)
    if one_window is None:
        shape = _result_shape(x, w, strides, dilation, pairs)
        return keras.ops.zeros(shape, dtype=x.dtype)
    x, strides, pairs = one_window
    return _CORRELATE[_BACKEND](
        x, w, tuple(strides), tuple(dilation), groups, pairs
    )


def runs_groups_apart(w_shape, strides, dilation, groups) -> bool:
    """Whether ``correlate`` computes a grouped convolution with kernel
    shape ``w_shape`` as one convolution per group (TensorFlow, outside its
    depthwise op), splitting the channels of ``x`` and ``w`` into copies. A
    caller that can lay out each group's operands contiguously in the
    leading axis, where a slice is a view, can call it per group instead and
    save those copies."""
    return (
        _BACKEND == "tensorflow"
        and groups > 1
        and not _tf_depthwise(w_shape, strides, dilation, groups)
    )


def sums_depthwise_taps() -> bool:
    """Whether ``kernel_gradient`` computes a depthwise kernel gradient at
    stride 1 tap by tap, as sums of products, rather than as a grouped
    convolution whose filter (the delta) is as large as the image.

    JAX and torch run that convolution slowly (measured, 3x3, 64 channels,
    32x32, batch 16, kernel gradient alone: JAX 128 -> 28 ms, torch 52 ->
    9 ms). TensorFlow runs it fast as one convolution per group
    (``runs_groups_apart``) and not the taps: a graph runs them side by
    side, each with its own products (train-step peak 1.77 times the
    built-in layer's, against 0.99), and under XLA they took longer (time
    ratio 1.15, against 0.95).
    """
    return _BACKEND in ("jax", "torch")


def add_bias(z, b):
    """``z + b``, ``b`` added along the last (channel) axis."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        # TensorFlow's graph optimizer fuses a BiasAdd into the convolution
        # before it; an AddV2 it leaves as a separate pass over ``z``.
        return tf.nn.bias_add(z, b)
    return z + b


def traced_by_torch_compile() -> bool:
    """Whether ``torch.compile`` is tracing the code that calls this.

    Its tracer hands sizes over as symbolic ints that pass for Python ints
    (``isinstance(size, int)`` holds), yet every comparison or division of
    one makes it prove a fact about all sizes: the phase split's reshapes
    then take minutes per layer to trace.
    """
    if _BACKEND != "torch":
        return False
    import torch

    return torch.compiler.is_compiling()


def _static(pairs) -> bool:
    return all(isinstance(v, int) for pair in pairs for v in pair)


def _result_shape(x, w, strides, dilation, pairs):
    """The shape of ``correlate``'s result (with static sizes)."""
    rank = len(strides)
    lengths = [
        max((n + lo + hi - (k - 1) * d - 1) // s + 1, 0)
        for n, k, s, d, (lo, hi) in zip(
            x.shape[1:-1], w.shape[:rank], strides, dilation, pairs
        )
    ]
    return (x.shape[0], *lengths, w.shape[-1])


def _empty_result(x, w, strides, dilation, pairs):
    """The result's shape when it is empty or a sum of no terms, else None.

    Backends refuse such convolutions (an input shorter than the kernel, a
    kernel or a channel axis of size zero), yet the backward rules meet them
    whenever a batch or an input is empty: the kernel gradient of an empty
    batch is a correlation over zero "channels". Their value is zeros.
    """
    if any(n is None for n in (*x.shape, *w.shape)):
        return None
    shape = _result_shape(x, w, strides, dilation, pairs)
    if 0 in shape or 0 in w.shape:
        return shape
    return None


def _one_window_unstrided(x, w, strides, dilation, pairs):
    """``(x, strides, pairs)`` with stride 1 on every axis that has a single
    output position, ``x`` cut or padded to exactly that window; None if the
    window reads only padding (the result is then zeros).

    One window has no stride to speak of, and this keeps the convolution
    away from a oneDNN bug that TensorFlow's and torch's CPU kernels share
    (TensorFlow 2.21, torch 2.13): in float32, one input channel, an output
    width of 1 at a width stride above 1, an output height of at least 2
    and a batch of at least 2 give uninitialised memory, not the sums (the
    kernel gradient meets that shape at batch 1 with a dilated, one-tap
    kernel axis). See docs/backend-notes.md.
    """
    strides, pairs = list(strides), list(pairs)
    for axis, s in enumerate(strides):
        size = x.shape[axis + 1]
        if s == 1 or size is None:
            continue
        before, after = pairs[axis]
        span = (w.shape[axis] - 1) * dilation[axis] + 1
        if size + before + after - span >= s:
            continue  # a second window
        strides[axis] = 1
        read = span - before  # entries of x the window reads, at most
        if read <= 0:
            return None
        if read < size:
            index = [slice(None)] * len(x.shape)
            index[axis + 1] = slice(0, read)
            x = x[tuple(index)]
        pairs[axis] = (before, span - before - min(read, size))
    return x, tuple(strides), tuple(pairs)


def custom_gradient(forward: Callable, backward: Callable) -> Callable:
    """``forward(*tensors)`` whose gradient is ``backward(upstream,
    *tensors, needed=...)``.

    ``backward`` returns one gradient per tensor and is written with
    differentiable operations, so higher-order gradients follow it too.
    ``needed[i]`` is False where nothing will read the ``i``-th gradient,
    and ``backward`` may return None there instead of computing it. Only
    torch says so (a first layer's input, a frozen kernel: torch runs
    every operation it is given); a TensorFlow graph and a jitted JAX
    function drop the unread work themselves, so there every gradient is
    asked for.
    """
    return _CUSTOM_GRADIENT[_BACKEND](forward, backward)


def after(x, *earlier):
    """``x``, in a TensorFlow graph read only once ``earlier`` are computed
    (elsewhere ``x``: eager code runs in the order it is written, and XLA
    schedules on its own).

    A TensorFlow graph runs every op as soon as its inputs exist, so a
    backward rule's work on the layer's input alone would run during the
    forward pass, and two rules' temporaries would live at once; this
    orders them as eager mode would."""
    if _BACKEND != "tensorflow":
        return x
    import tensorflow as tf

    if tf.executing_eagerly():
        return x
    with tf.control_dependencies(earlier):
        return tf.identity(x)


def pads_by_copy(rank: int) -> bool:
    """Whether ``correlate`` on ``rank`` spatial axes writes out a padded
    copy of ``x`` for padding TensorFlow's ``"SAME"`` rule does not cover
    (TensorFlow's 1D and 3D convolutions take no explicit padding)."""
    return _BACKEND == "tensorflow" and rank != 2


def shared_filter(w):
    """``w``, a filter ``(*K, C_in, C_out)`` that several ``correlate``
    calls read, laid out once in the memory order the backend's
    convolution reads it in, so that each call does not copy it again.

    Only torch copies per call: its CPU convolution reads a filter as
    ``(C_out, *K, C_in)`` in memory next to a channels-last input (the
    layout ``correlate`` hands it), and 1D as ``(C_out, C_in, K)``.
    Measured, the 7x7 stride-2 kernel gradient of a 3-channel 64x64 batch
    of 16, four phases sharing a 4 MiB filter: 29.1 -> 18.4 ms.
    """
    if _BACKEND != "torch":
        return w
    rank = len(w.shape) - 2
    if rank == 1:
        memory = w.permute(2, 1, 0).contiguous()
        return memory.permute(2, 1, 0)
    memory = w.permute(rank + 1, *range(rank), rank).contiguous()
    return memory.permute(*range(1, rank + 1), rank + 1, 0)


def pad(x, widths: Sequence[tuple[int, int]]):
    """``x`` with ``widths[axis] = (before, after)`` zeros added to each
    axis."""
    return _PAD[_BACKEND](x, widths)


def _tf_correlate(x, w, strides, dilation, groups, pairs):
    out = _tf_convolve(x, w, strides, dilation, groups, pairs)
    if all(n is not None for n in (*x.shape, *w.shape)):
        return out
    return _tf_reshaped(out, x, w, strides, dilation, pairs)


def _tf_reshaped(out, x, w, strides, dilation, pairs):
    """``out`` with the shape the arithmetic gives, where sizes are known
    only when the graph runs.

    TensorFlow's oneDNN convolution (on by default on CPUs with
    AVX512_VNNI or AVX512_BF16) returns its input unchanged where the
    result is empty: an empty batch, or an input shorter than the kernel.
    Where the result is not empty, its elements are all kept and this is
    free; where it is empty, none are.
    """
    import tensorflow as tf

    rank = len(strides)
    sizes, kernel = _tf_sizes(x), _tf_sizes(w)
    lengths = [
        _at_least_zero((n + lo + hi - (k - 1) * d - 1) // s + 1)
        for n, k, s, d, (lo, hi) in zip(
            sizes[1:-1], kernel[:rank], strides, dilation, pairs
        )
    ]
    shape = [sizes[0], *lengths, kernel[-1]]
    flat = tf.reshape(out, [-1])[: tf.reduce_prod(tf.stack(shape))]
    shaped = tf.reshape(flat, tf.stack(shape))
    shaped.set_shape([v if isinstance(v, int) else None for v in shape])
    return shaped


def _tf_sizes(x):
    """``x``'s sizes: ints where known as the graph is built, else
    tensors."""
    import tensorflow as tf

    dynamic = tf.unstack(tf.shape(x))
    return [n if n is not None else dynamic[i] for i, n in enumerate(x.shape)]


def _at_least_zero(n):
    if isinstance(n, int):
        return max(n, 0)
    import tensorflow as tf

    return tf.maximum(n, 0)


def _tf_convolve(x, w, strides, dilation, groups, pairs):
    import tensorflow as tf

    rank = len(strides)
    padding = _tf_padding(x.shape, w.shape, strides, dilation, pairs)
    if padding == "EXPLICIT" and rank != 2:
        # Only the 2D convolutions take explicit padding.
        x = tf.pad(x, [(0, 0), *pairs, (0, 0)])
        padding = "VALID"
    elif padding == "EXPLICIT":
        padding = [(0, 0), *pairs, (0, 0)]
    if _tf_depthwise(w.shape, strides, dilation, groups):
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
    # (TensorFlow 2.21, 16x32x32x64, 3x3, groups 4: 12.8 ms against 9.4 ms
    # per group, 15.0 against 8.6 ms under XLA).
    return tf.concat(
        [
            one(xg, wg)
            for xg, wg in zip(
                tf.split(x, groups, axis=-1), tf.split(w, groups, axis=-1)
            )
        ],
        axis=-1,
    )


def _tf_depthwise(w_shape, strides, dilation, groups) -> bool:
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


def _tf_padding(x_shape, w_shape, strides, dilation, pairs):
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


def _tf_custom_gradient(forward, backward):
    import tensorflow as tf

    @tf.custom_gradient
    def op(*tensors):
        def grad(upstream):
            return backward(upstream, *tensors, needed=(True,) * len(tensors))

        return forward(*tensors), grad

    return op


_JAX_LAYOUTS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _jax_correlate(x, w, strides, dilation, groups, pairs):
    import jax

    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding=pairs,
        rhs_dilation=dilation,
        dimension_numbers=_JAX_LAYOUTS[len(strides)],
        feature_group_count=groups,
    )


def _jax_custom_gradient(forward, backward):
    import jax

    @jax.custom_vjp
    def op(*tensors):
        return forward(*tensors)

    def op_forward(*tensors):
        return forward(*tensors), tensors

    def op_backward(tensors, upstream):
        needed = (True,) * len(tensors)
        return tuple(backward(upstream, *tensors, needed=needed))

    op.defvjp(op_forward, op_backward)
    return op


def _torch_correlate(x, w, strides, dilation, groups, pairs):
    import torch.nn.functional as F

    rank = len(strides)
    padding = 0
    if all(lo == hi for lo, hi in pairs):
        # Symmetric padding the convolution adds as it reads.
        padding = tuple(lo for lo, _ in pairs)
    else:
        x = _torch_pad(x, [(0, 0), *pairs, (0, 0)])
    channels_first = (0, rank + 1, *range(1, rank + 1))
    channels_last = (0, *range(2, rank + 2), 1)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    out = conv(
        x.permute(channels_first),
        w.permute(rank + 1, rank, *range(rank)),
        stride=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    return out.permute(channels_last)


def _torch_pad(x, widths):
    import torch.nn.functional as F

    # keras.ops.pad builds a Keras Operation object on every call, a side
    # effect torch.compile refuses inside an autograd function; F.pad is the
    # same zero padding without it. F.pad lists the last axis first.
    x = keras.ops.convert_to_tensor(x)
    return F.pad(x, [v for pair in reversed(widths) for v in pair])


def _torch_custom_gradient(forward, backward):
    import torch

    def op(*tensors):
        if not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        ):
            # Autograd records nothing here, so there is no gradient to
            # customize: inference, or a backward pass that is not itself
            # differentiated.
            return forward(*tensors)
        return _TorchDerivedGradient.apply(forward, backward, *tensors)

    return op


if _BACKEND == "torch":
    import torch

    class _TorchDerivedGradient(torch.autograd.Function):
        """The derived backward pass as a torch autograd function.

        Used directly rather than through ``keras.ops.custom_gradient``,
        whose torch version swallows exceptions raised in the forward
        function and returns NaN gradients. Defined once, at import:
        ``torch.compile`` cannot trace a class statement, so a class made
        per call would break the compiled graph at every layer.
        """

        @staticmethod
        def forward(ctx, forward, backward, *tensors):
            ctx.derived_backward = backward
            ctx.save_for_backward(*tensors)
            return forward(*tensors)

        @staticmethod
        def backward(ctx, upstream):
            grads = ctx.derived_backward(
                upstream, *ctx.saved_tensors, needed=ctx.needs_input_grad[2:]
            )
            return (None, None, *grads)


_PAD = {
    "tensorflow": keras.ops.pad,
    "jax": keras.ops.pad,
    "torch": _torch_pad,
}
_CORRELATE = {
    "tensorflow": _tf_correlate,
    "jax": _jax_correlate,
    "torch": _torch_correlate,
}
_CUSTOM_GRADIENT = {
    "tensorflow": _tf_custom_gradient,
    "jax": _jax_custom_gradient,
    "torch": _torch_custom_gradient,
}
