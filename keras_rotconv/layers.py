"""Keras convolution layers whose backward pass is the derived one.

Each layer is the built-in Keras layer of the same rank with one method
replaced: ``call`` runs ``keras_rotconv.ops.conv``, whose gradient is the
rotated-kernel full convolution (input delta), the valid correlation of input
and delta (kernel gradient) and the sum of the delta (bias gradient).
Constructor arguments, defaults, validation, weights, LoRA, shapes and
configuration are those of the built-in layer.
"""

from __future__ import annotations

import operator

import keras
from keras import ops

from keras_rotconv import ops as rotconv_ops


class _RotConv:
    """Mixin that routes a Keras ``BaseConv`` subclass through ``ops.conv``."""

    def __init__(self, filters, *args, **kwargs):
        try:
            super().__init__(filters, *args, **kwargs)
        except TypeError as error:
            # Keras compares filters with zero, so a value of the wrong type
            # (a list, a string: a hand-edited saved config) fails there with
            # a TypeError about "<=" that names neither. Same error type,
            # saying which argument and value.
            if filters is None or _compares_with_zero(filters):
                raise
            raise TypeError(
                "Invalid type for argument `filters`. Expected a positive "
                f"integer. Received: filters={filters!r} of type "
                f"{type(filters).__name__}"
            ) from error

    def call(self, inputs):
        rank = self.rank
        channels_first = self.data_format == "channels_first"
        x = inputs
        if channels_first:
            x = ops.transpose(x, (0, *range(2, rank + 2), 1))
        spatial = tuple(ops.shape(x)[1:-1])
        pairs = rotconv_ops.padding_pairs(
            spatial,
            self.kernel_size,
            self.strides,
            self.dilation_rate,
            self.padding,
        )
        self._check_output_size(spatial, pairs, inputs.shape)
        kernel = ops.cast(self.kernel, x.dtype)
        bias = ops.cast(self.bias, x.dtype) if self.use_bias else None
        outputs = rotconv_ops.conv(
            x,
            kernel,
            bias,
            strides=self.strides,
            dilation=self.dilation_rate,
            pairs=pairs,
            groups=self.groups,
        )
        if channels_first:
            outputs = ops.transpose(outputs, (0, rank + 1, *range(1, rank + 1)))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _check_output_size(self, spatial, pairs, input_shape):
        """Keras's rule: a non-empty input must give a non-empty output (an
        empty input may give an empty output)."""
        for size, k, s, d, pad in zip(
            spatial, self.kernel_size, self.strides, self.dilation_rate, pairs
        ):
            if (
                isinstance(size, int)
                and size > 0
                and rotconv_ops.output_size(size, k, s, d, pad) <= 0
            ):
                raise ValueError(
                    "The convolution would produce an empty output: the "
                    "input is smaller than the dilated kernel. Received: "
                    f"input_shape={tuple(input_shape)}, "
                    f"kernel_size={self.kernel_size}, "
                    f"dilation_rate={self.dilation_rate}, "
                    f"strides={self.strides}, padding={self.padding}"
                )


def _compares_with_zero(value) -> bool:
    try:
        operator.le(value, 0)
    except TypeError:
        return False
    return True


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotConv1D(_RotConv, keras.layers.Conv1D):
    """1D convolution layer (e.g. temporal convolution) whose backward pass is
    the derived one.

    A drop-in for `keras.layers.Conv1D`, `"causal"` padding included: it
    takes the same arguments, creates the same weights and computes the same
    outputs. Its gradients are the derivation's, one spatial axis at a time
    (see `RotConv2D` and `keras_rotconv.ops`):

    - input delta: `delta_prev = (delta * rot180(kernel))_full`, the full
      convolution of the output delta with the kernel reversed in time and
      its channel axes swapped;
    - kernel gradient: `dC/dkernel = a_prev ⋆ delta`, the valid correlation
      of the (padded) input with the output delta;
    - bias gradient: `dC/dbias = Σ delta`.

    Args:
        filters: int, the dimension of the output space (the number of
            filters in the convolution).
        kernel_size: int or tuple/list of 1 integer, the size of the
            convolution window.
        strides: int or tuple/list of 1 integer, the stride length of the
            convolution. `strides > 1` is incompatible with
            `dilation_rate > 1`.
        padding: string, `"valid"`, `"same"` or `"causal"`
            (case-insensitive). `"valid"` means no padding. `"same"` pads
            evenly to the left/right of the input, the odd extra zero going
            right; with `strides=1` the output then has the same length as
            the input. `"causal"` pads `dilation_rate * (kernel_size - 1)`
            zeros on the left only, so that `output[t]` does not depend on
            `input[t + 1:]` (WaveNet, https://arxiv.org/abs/1609.03499).
        data_format: string, either `"channels_last"` or `"channels_first"`.
            Defaults to the `image_data_format` of the Keras config
            (`"channels_last"` unless changed).
        dilation_rate: int or tuple/list of 1 integer, the dilation rate to
            use for dilated convolution.
        groups: A positive int specifying the number of groups in which the
            input is split along the channel axis. Each group is convolved
            separately with `filters // groups` filters. `groups` must
            divide both the input channels and `filters`.
        activation: Activation function. If `None`, no activation is applied.
        use_bias: bool, if `True`, bias will be added to the output.
        kernel_initializer: Initializer for the convolution kernel. If
            `None`, the default initializer (`"glorot_uniform"`) is used.
        bias_initializer: Initializer for the bias vector. If `None`, the
            default initializer (`"zeros"`) is used.
        kernel_regularizer: Optional regularizer for the convolution kernel.
        bias_regularizer: Optional regularizer for the bias vector.
        activity_regularizer: Optional regularizer function for the output.
        kernel_constraint: Optional projection function to be applied to the
            kernel after being updated by an `Optimizer`.
        bias_constraint: Optional projection function to be applied to the
            bias after being updated by an `Optimizer`.
        lora_rank: Optional integer. If set, the kernel is trained as a
            frozen kernel plus a low-rank update of this rank (LoRA); see
            `enable_lora`.
        lora_alpha: Optional integer scaling the LoRA update by
            `lora_alpha / lora_rank`.

    Input shape:
        - If `data_format="channels_last"`:
            A 3D tensor with shape: `(batch_size, steps, channels)`
        - If `data_format="channels_first"`:
            A 3D tensor with shape: `(batch_size, channels, steps)`

    Output shape:
        - If `data_format="channels_last"`:
            A 3D tensor with shape: `(batch_size, new_steps, filters)`
        - If `data_format="channels_first"`:
            A 3D tensor with shape: `(batch_size, filters, new_steps)`

    Returns:
        A 3D tensor representing `activation(conv1d(inputs, kernel) + bias)`.

    Raises:
        ValueError: when both `strides > 1` and `dilation_rate > 1`, and in
            every other case where `keras.layers.Conv1D` raises.

    Example:

    >>> x = np.random.rand(4, 10, 128)
    >>> y = keras_rotconv.RotConv1D(32, 3, padding="causal")(x)
    >>> print(tuple(y.shape))
    (4, 10, 32)
    """


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotConv2D(_RotConv, keras.layers.Conv2D):
    """2D convolution layer whose backward pass is the derived one.

    A drop-in for `keras.layers.Conv2D`: it takes the same arguments, creates
    the same weights and computes the same outputs. Its gradients are written
    out as the derivation of convolutional backpropagation gives them, as
    convolutions, rather than taken from the framework's convolution-gradient
    kernels:

    - input delta: `delta_prev = (delta * rot180(kernel))_full`, the full
      convolution of the output delta with the kernel rotated by 180 degrees;
    - kernel gradient: `dC/dkernel = a_prev ⋆ delta`, the valid correlation
      of the (padded) input with the output delta;
    - bias gradient: `dC/dbias = Σ delta`.

    The functions that compute them are in `keras_rotconv.ops`, and
    `keras_rotconv.reference` counts the same sums out in plain NumPy.

    Args:
        filters: int, the dimension of the output space (the number of
            filters in the convolution).
        kernel_size: int or tuple/list of 2 integers, the size of the
            convolution window.
        strides: int or tuple/list of 2 integers, the stride length of the
            convolution. `strides > 1` is incompatible with
            `dilation_rate > 1`.
        padding: string, either `"valid"` or `"same"` (case-insensitive).
            `"valid"` means no padding. `"same"` pads evenly to the
            left/right or up/down of the input, the odd extra zero going
            right or down; with `strides=1` the output then has the same
            size as the input.
        data_format: string, either `"channels_last"` or `"channels_first"`.
            Defaults to the `image_data_format` of the Keras config
            (`"channels_last"` unless changed).
        dilation_rate: int or tuple/list of 2 integers, the dilation rate to
            use for dilated convolution.
        groups: A positive int specifying the number of groups in which the
            input is split along the channel axis. Each group is convolved
            separately with `filters // groups` filters. `groups` must
            divide both the input channels and `filters`.
        activation: Activation function. If `None`, no activation is applied.
        use_bias: bool, if `True`, bias will be added to the output.
        kernel_initializer: Initializer for the convolution kernel. If
            `None`, the default initializer (`"glorot_uniform"`) is used.
        bias_initializer: Initializer for the bias vector. If `None`, the
            default initializer (`"zeros"`) is used.
        kernel_regularizer: Optional regularizer for the convolution kernel.
        bias_regularizer: Optional regularizer for the bias vector.
        activity_regularizer: Optional regularizer function for the output.
        kernel_constraint: Optional projection function to be applied to the
            kernel after being updated by an `Optimizer`.
        bias_constraint: Optional projection function to be applied to the
            bias after being updated by an `Optimizer`.
        lora_rank: Optional integer. If set, the kernel is trained as a
            frozen kernel plus a low-rank update of this rank (LoRA); see
            `enable_lora`.
        lora_alpha: Optional integer scaling the LoRA update by
            `lora_alpha / lora_rank`.

    Input shape:
        - If `data_format="channels_last"`:
            A 4D tensor with shape: `(batch_size, height, width, channels)`
        - If `data_format="channels_first"`:
            A 4D tensor with shape: `(batch_size, channels, height, width)`

    Output shape:
        - If `data_format="channels_last"`:
            A 4D tensor with shape:
            `(batch_size, new_height, new_width, filters)`
        - If `data_format="channels_first"`:
            A 4D tensor with shape:
            `(batch_size, filters, new_height, new_width)`

    Returns:
        A 4D tensor representing `activation(conv2d(inputs, kernel) + bias)`.

    Raises:
        ValueError: when both `strides > 1` and `dilation_rate > 1`, and in
            every other case where `keras.layers.Conv2D` raises.

    Example:

    >>> x = np.random.rand(4, 10, 10, 128)
    >>> y = keras_rotconv.RotConv2D(32, 3, activation="relu")(x)
    >>> print(tuple(y.shape))
    (4, 8, 8, 32)
    """


@keras.saving.register_keras_serializable(package="keras_rotconv")
class RotConv3D(_RotConv, keras.layers.Conv3D):
    """3D convolution layer whose backward pass is the derived one.

    A drop-in for `keras.layers.Conv3D`: it takes the same arguments, creates
    the same weights and computes the same outputs. Its gradients are the
    derivation's over three spatial axes (see `RotConv2D` and
    `keras_rotconv.ops`):

    - input delta: `delta_prev = (delta * rot180(kernel))_full`, the full
      convolution of the output delta with the kernel flipped along all
      three spatial axes and its channel axes swapped;
    - kernel gradient: `dC/dkernel = a_prev ⋆ delta`, the valid correlation
      of the (padded) input with the output delta;
    - bias gradient: `dC/dbias = Σ delta`.

    Args:
        filters: int, the dimension of the output space (the number of
            filters in the convolution).
        kernel_size: int or tuple/list of 3 integers, the size of the
            convolution window.
        strides: int or tuple/list of 3 integers, the stride length of the
            convolution. `strides > 1` is incompatible with
            `dilation_rate > 1`.
        padding: string, either `"valid"` or `"same"` (case-insensitive).
            `"valid"` means no padding. `"same"` pads evenly on both sides
            of each spatial axis, the odd extra zero going after; with
            `strides=1` the output then has the same size as the input.
        data_format: string, either `"channels_last"` or `"channels_first"`.
            Defaults to the `image_data_format` of the Keras config
            (`"channels_last"` unless changed).
        dilation_rate: int or tuple/list of 3 integers, the dilation rate to
            use for dilated convolution.
        groups: A positive int specifying the number of groups in which the
            input is split along the channel axis. Each group is convolved
            separately with `filters // groups` filters. `groups` must
            divide both the input channels and `filters`.
        activation: Activation function. If `None`, no activation is applied.
        use_bias: bool, if `True`, bias will be added to the output.
        kernel_initializer: Initializer for the convolution kernel. If
            `None`, the default initializer (`"glorot_uniform"`) is used.
        bias_initializer: Initializer for the bias vector. If `None`, the
            default initializer (`"zeros"`) is used.
        kernel_regularizer: Optional regularizer for the convolution kernel.
        bias_regularizer: Optional regularizer for the bias vector.
        activity_regularizer: Optional regularizer function for the output.
        kernel_constraint: Optional projection function to be applied to the
            kernel after being updated by an `Optimizer`.
        bias_constraint: Optional projection function to be applied to the
            bias after being updated by an `Optimizer`.
        lora_rank: Optional integer. If set, the kernel is trained as a
            frozen kernel plus a low-rank update of this rank (LoRA); see
            `enable_lora`.
        lora_alpha: Optional integer scaling the LoRA update by
            `lora_alpha / lora_rank`.

    Input shape:
        - If `data_format="channels_last"`:
            A 5D tensor with shape:
            `(batch_size, spatial_dim1, spatial_dim2, spatial_dim3, channels)`
        - If `data_format="channels_first"`:
            A 5D tensor with shape:
            `(batch_size, channels, spatial_dim1, spatial_dim2, spatial_dim3)`

    Output shape:
        - If `data_format="channels_last"`:
            A 5D tensor with shape: `(batch_size, new_spatial_dim1,
            new_spatial_dim2, new_spatial_dim3, filters)`
        - If `data_format="channels_first"`:
            A 5D tensor with shape: `(batch_size, filters, new_spatial_dim1,
            new_spatial_dim2, new_spatial_dim3)`

    Returns:
        A 5D tensor representing `activation(conv3d(inputs, kernel) + bias)`.

    Raises:
        ValueError: when both `strides > 1` and `dilation_rate > 1`, and in
            every other case where `keras.layers.Conv3D` raises.

    Example:

    >>> x = np.random.rand(4, 10, 10, 10, 8)
    >>> y = keras_rotconv.RotConv3D(16, 3, activation="relu")(x)
    >>> print(tuple(y.shape))
    (4, 8, 8, 8, 16)
    """
