"""The rest of Keras's convolution layers on the derived rules: transposed,
depthwise and separable convolutions.

As in ``keras_rotconv.layers``, each class is the built-in Keras layer with
``call`` replaced, so that arguments, defaults, validation, weights (and
their names), shapes and configuration are Keras's own. The convolutions run
through ``keras_rotconv.ops.conv`` (depthwise, separable) or
``keras_rotconv.transpose.conv_transpose`` (transposed), whose gradients are
the derivation's and never a framework's convolution gradient.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_rotconv import ops as rotconv_ops
from keras_rotconv.transpose import conv_transpose


def _channels_last(layer, x):
    """``x`` in channels-last layout, whatever the layer's data format."""
    if layer.data_format == "channels_first":
        rank = layer.rank
        return ops.transpose(x, (0, *range(2, rank + 2), 1))
    return x


def _finish(layer, outputs):
    """``outputs`` (channels-last) back in the layer's data format, through
    its activation."""
    if layer.data_format == "channels_first":
        rank = layer.rank
        outputs = ops.transpose(outputs, (0, rank + 1, *range(1, rank + 1)))
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


def _bias(layer, dtype):
    return ops.cast(layer.bias, dtype) if layer.use_bias else None


def _depthwise(layer, x, kernel, bias=None):
    """The depthwise convolution of channels-last ``x`` with a Keras
    depthwise kernel ``(*K, C, multiplier)``: a grouped convolution, one
    group per input channel. Keras orders the outputs channel by channel
    (output ``c·multiplier + j`` is filter ``j`` of channel ``c``), which is
    the order of the package's grouped kernel ``(*K, 1, C·multiplier)``, so
    the kernel is only reshaped."""
    channels, multiplier = kernel.shape[-2:]
    grouped = ops.reshape(
        kernel, (*kernel.shape[:-2], 1, channels * multiplier)
    )
    spatial = tuple(ops.shape(x)[1:-1])
    pairs = rotconv_ops.padding_pairs(
        spatial,
        layer.kernel_size,
        layer.strides,
        layer.dilation_rate,
        layer.padding,
    )
    return rotconv_ops.conv(
        x,
        grouped,
        bias,
        strides=layer.strides,
        dilation=layer.dilation_rate,
        pairs=pairs,
        groups=channels,
    )


class _RotConvTranspose:
    """Mixin that routes a Keras ``BaseConvTranspose`` subclass through
    ``transpose.conv_transpose``."""

    def call(self, inputs):
        x = _channels_last(self, inputs)
        outputs = conv_transpose(
            x,
            ops.cast(self.kernel, x.dtype),
            _bias(self, x.dtype),
            strides=self.strides,
            dilation=self.dilation_rate,
            padding=self.padding,
            output_padding=self.output_padding,
        )
        return _finish(self, outputs)


class _RotDepthwiseConv:
    """Mixin that routes a Keras ``BaseDepthwiseConv`` subclass through
    ``ops.conv`` with one group per input channel."""

    def call(self, inputs):
        x = _channels_last(self, inputs)
        kernel = ops.cast(self.kernel, x.dtype)
        outputs = _depthwise(self, x, kernel, _bias(self, x.dtype))
        return _finish(self, outputs)


class _RotSeparableConv:
    """Mixin that routes a Keras ``BaseSeparableConv`` subclass through
    ``ops.conv`` twice: the depthwise convolution, then the pointwise
    (1x1) one, which adds the bias."""

    def call(self, inputs):
        x = _channels_last(self, inputs)
        depthwise = _depthwise(
            self, x, ops.cast(self.depthwise_kernel, x.dtype)
        )
        rank = self.rank
        outputs = rotconv_ops.conv(
            depthwise,
            ops.cast(self.pointwise_kernel, x.dtype),
            _bias(self, x.dtype),
            strides=(1,) * rank,
            dilation=(1,) * rank,
        )
        return _finish(self, outputs)


_DERIVED = """
    Its gradients are the derivation's (`keras_rotconv.ops`): input delta
    `(delta * rot180(kernel))_full`, kernel gradient `a_prev ⋆ delta`, bias
    gradient `Σ delta`; never the framework's convolution gradient.
"""

_TRANSPOSED = """
    The forward pass is itself the derivation's input delta: the input is
    spread by the strides and fully convolved with `rot180(kernel)`, cropped
    to Keras's output size (`padding`, `output_padding` as Keras reads
    them; see `keras_rotconv.transpose`). Its backward pass is the
    derivation read the other way round: the input delta is the forward
    correlation of the upstream delta with the kernel, the kernel gradient
    the valid correlation of the upstream (as the input) with the layer's
    input (as the delta), the bias gradient `Σ delta`.
"""


def _doc(summary, keras_name, body):
    return (
        f"{summary}\n\n    A drop-in for `keras.layers.{keras_name}`: the "
        "same arguments,\n    defaults, errors, weights and configuration "
        f"(see its documentation\n    for `Args`, input and output shapes).\n"
        f"{body}"
    )


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotConv1DTranspose(_RotConvTranspose, keras.layers.Conv1DTranspose):
    __doc__ = _doc(
        "1D transposed convolution computed by the derived rules.",
        "Conv1DTranspose",
        _TRANSPOSED,
    )


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotConv2DTranspose(_RotConvTranspose, keras.layers.Conv2DTranspose):
    __doc__ = _doc(
        "2D transposed convolution computed by the derived rules.",
        "Conv2DTranspose",
        _TRANSPOSED
        + """
    Example:

    >>> x = np.random.rand(4, 10, 8, 128)
    >>> y = keras_rotconv.RotConv2DTranspose(32, 2, 2)(x)
    >>> print(tuple(y.shape))
    (4, 20, 16, 32)
""",
    )


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotConv3DTranspose(_RotConvTranspose, keras.layers.Conv3DTranspose):
    __doc__ = _doc(
        "3D transposed convolution computed by the derived rules.",
        "Conv3DTranspose",
        _TRANSPOSED,
    )


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotDepthwiseConv1D(_RotDepthwiseConv, keras.layers.DepthwiseConv1D):
    __doc__ = _doc(
        "1D depthwise convolution whose backward pass is the derived one.",
        "DepthwiseConv1D",
        _DERIVED,
    )


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotDepthwiseConv2D(_RotDepthwiseConv, keras.layers.DepthwiseConv2D):
    __doc__ = _doc(
        "2D depthwise convolution whose backward pass is the derived one.",
        "DepthwiseConv2D",
        _DERIVED
        + """
    Example:

    >>> x = np.random.rand(4, 10, 10, 12)
    >>> y = keras_rotconv.RotDepthwiseConv2D(3, depth_multiplier=2)(x)
    >>> print(tuple(y.shape))
    (4, 8, 8, 24)
""",
    )


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotSeparableConv1D(_RotSeparableConv, keras.layers.SeparableConv1D):
    __doc__ = _doc(
        "1D separable convolution whose backward pass is the derived one.",
        "SeparableConv1D",
        _DERIVED,
    )


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotSeparableConv2D(_RotSeparableConv, keras.layers.SeparableConv2D):
    __doc__ = _doc(
        "2D separable convolution whose backward pass is the derived one.",
        "SeparableConv2D",
        _DERIVED
        + """
    Example:

    >>> x = np.random.rand(4, 10, 10, 12)
    >>> y = keras_rotconv.RotSeparableConv2D(32, 3)(x)
    >>> print(tuple(y.shape))
    (4, 8, 8, 32)
""",
    )
