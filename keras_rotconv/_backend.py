"""The backend seam: the two things the derivation cannot say in ``keras.ops``.

``correlate`` is a plain valid, strided, dilated, grouped convolution in
channels-last layout, the forward primitive every rule in ``ops`` is built
from. ``custom_gradient`` attaches a backward function to a forward one using
the backend's own mechanism. The formulas themselves live in ``ops`` and are
written once.
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
    return _CORRELATE[_BACKEND](x, w, tuple(strides), tuple(dilation), groups)


def custom_gradient(forward: Callable, backward: Callable) -> Callable:
    """``forward(*tensors)`` whose gradient is ``backward(upstream, *tensors)``.

    ``backward`` returns one gradient per tensor and is written with
    differentiable operations, so higher-order gradients follow it too.
    """
    return _CUSTOM_GRADIENT[_BACKEND](forward, backward)


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


def _torch_custom_gradient(forward, backward):
    import torch

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            ctx.save_for_backward(*tensors)
            return forward(*tensors)

        @staticmethod
        def backward(ctx, upstream):
            return tuple(backward(upstream, *ctx.saved_tensors))

    return Op.apply


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
