"""The backend seam: what the derivation cannot say in ``keras.ops``.

``correlate`` is a plain valid, strided, dilated, grouped convolution in
channels-last layout, the forward primitive every rule in ``ops`` is built
from. ``custom_gradient`` attaches a backward function to a forward one using
the backend's own mechanism. ``pad`` is zero padding. The formulas themselves
live in ``ops`` and are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras

_BACKEND = keras.backend.backend()


def correlate(
    x, w, strides: Sequence[int], dilation: Sequence[int], groups: int
):
    """``out[n, p, o] = Σ_{k, i} x[n, p·strides + k·dilation, i] w[k, i, o]``
    with no padding, each group of channels on its own.

    ``x`` is ``(N, *S, C_in)``, ``w`` is ``(*K, C_in // groups, C_out)``.
    """
    empty = _empty_result(x, w, strides, dilation)
    if empty is not None:
        return keras.ops.zeros(empty, dtype=x.dtype)
    return _CORRELATE[_BACKEND](x, w, tuple(strides), tuple(dilation), groups)


def _empty_result(x, w, strides, dilation):
    """The result's shape when it is empty or a sum of no terms, else None.

    Backends refuse such convolutions (an input shorter than the kernel, a
    kernel or a channel axis of size zero), yet the backward rules meet them
    whenever a batch or an input is empty: the kernel gradient of an empty
    batch is a correlation over zero "channels". Their value is zeros.
    """
    rank = len(strides)
    sizes = (*x.shape, *w.shape)
    if any(n is None for n in sizes):
        return None
    lengths = [
        max((n - (k - 1) * d - 1) // s + 1, 0)
        for n, k, s, d in zip(x.shape[1:-1], w.shape[:rank], strides, dilation)
    ]
    shape = (x.shape[0], *lengths, w.shape[-1])
    if 0 in shape or 0 in w.shape:
        return shape
    return None


def custom_gradient(forward: Callable, backward: Callable) -> Callable:
    """``forward(*tensors)`` whose gradient is ``backward(upstream, *tensors)``.

    ``backward`` returns one gradient per tensor and is written with
    differentiable operations, so higher-order gradients follow it too.
    """
    return _CUSTOM_GRADIENT[_BACKEND](forward, backward)


def pad(x, widths: Sequence[tuple[int, int]]):
    """``x`` with ``widths[axis] = (before, after)`` zeros added to each
    axis."""
    return _PAD[_BACKEND](x, widths)


def _tf_correlate(x, w, strides, dilation, groups):
    import tensorflow as tf

    def one(x, w):
        return tf.nn.convolution(
            x, w, strides=strides, padding="VALID", dilations=dilation
        )

    if groups == 1:
        return one(x, w)
    # TensorFlow's grouped convolution has no CPU kernel outside XLA, so
    # each group runs as its own convolution.
    return tf.concat(
        [
            one(xg, wg)
            for xg, wg in zip(
                tf.split(x, groups, axis=-1), tf.split(w, groups, axis=-1)
            )
        ],
        axis=-1,
    )


def _tf_custom_gradient(forward, backward):
    import tensorflow as tf

    @tf.custom_gradient
    def op(*tensors):
        def grad(upstream):
            return backward(upstream, *tensors)

        return forward(*tensors), grad

    return op


_JAX_LAYOUTS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _jax_correlate(x, w, strides, dilation, groups):
    import jax

    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding="VALID",
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
        return tuple(backward(upstream, *tensors))

    op.defvjp(op_forward, op_backward)
    return op


def _torch_correlate(x, w, strides, dilation, groups):
    import torch.nn.functional as F

    rank = len(strides)
    channels_first = (0, rank + 1, *range(1, rank + 1))
    channels_last = (0, *range(2, rank + 2), 1)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    out = conv(
        x.permute(channels_first),
        w.permute(rank + 1, rank, *range(rank)),
        stride=strides,
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
            grads = ctx.derived_backward(upstream, *ctx.saved_tensors)
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
