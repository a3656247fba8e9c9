"""The fast paths of the derived backward pass stay exact.

The backward rules take shortcuts for speed: the convolution's own padding
(SAME or explicit) instead of a padded copy, strided axes split into phases
(stride-1 convolutions, no inserted zeros), TensorFlow's BiasAdd, and its
depthwise convolution for one channel per group.
Each is checked here against the independent oracle, Keras's built-in
``Conv2D`` differentiated by ``tf.GradientTape`` in float64, on
configurations that select it, to first and second order; the gradient
graphs are checked to contain none of TensorFlow's convolution-gradient
kernels; and the one case no Keras layer reaches, an axis both strided and
dilated (which keeps the zero insertion), is checked against
``keras_rotconv.reference``.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import keras_rotconv
from keras_rotconv import ops, reference
from keras_rotconv.forms import phases as phase_forms

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the fast paths and the oracle are TensorFlow's",
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# float64 gradients computed in a different order agree to rounding error;
# relative to the largest gradient entry.
FLOAT64_RTOL = 1e-10

FORBIDDEN_OPS = (
    "Conv2DBackpropInput",
    "Conv2DBackpropFilter",
    "Conv3DBackpropInput",
    "Conv3DBackpropFilter",
    "DepthwiseConv2dNativeBackpropInput",
    "DepthwiseConv2dNativeBackpropFilter",
)

CONFIGS = [
    # (kernel_size, strides, dilation_rate, padding, groups, size, cin, cout)
    (3, 1, 1, "same", 1, (7, 8), 4, 6),
    (3, 1, 1, "valid", 1, (7, 8), 4, 6),
    (1, 1, 1, "same", 1, (5, 6), 4, 6),
    (2, 1, 1, "same", 1, (7, 6), 4, 6),
    (5, 1, 1, "same", 1, (9, 8), 3, 5),
    ((3, 2), 1, 1, "same", 1, (7, 8), 4, 6),
    (3, 2, 1, "same", 1, (7, 8), 4, 6),
    (3, 2, 1, "valid", 1, (8, 9), 4, 6),
    (2, 2, 1, "same", 1, (8, 7), 4, 6),
    (5, 2, 1, "same", 1, (11, 10), 3, 5),
    (3, 3, 1, "same", 1, (10, 11), 4, 6),
    (3, 3, 1, "valid", 1, (10, 11), 4, 6),
    ((3, 2), (2, 1), 1, "same", 1, (9, 8), 4, 6),
    (1, 2, 1, "valid", 1, (7, 8), 4, 6),
    (7, 2, 1, "same", 1, (16, 15), 3, 8),
    (3, 1, 2, "same", 1, (9, 10), 4, 6),
    (3, 1, 2, "valid", 1, (9, 10), 4, 6),
    (2, 1, 2, "same", 1, (8, 7), 4, 6),
    (3, 1, 1, "same", 2, (7, 8), 4, 6),
    (3, 2, 1, "same", 2, (9, 8), 4, 6),
    (3, 1, 2, "valid", 2, (9, 8), 4, 6),
    (3, 1, 1, "same", 4, (7, 8), 4, 4),
    (3, 2, 1, "same", 4, (9, 8), 4, 4),
    (3, 1, 2, "same", 4, (9, 8), 4, 8),
    (2, 3, 1, "valid", 4, (9, 8), 4, 8),
]


def _config_id(config):
    k, s, d, padding, groups, size, *_ = config
    return f"k{k}-s{s}-d{d}-{padding}-g{groups}-{size[0]}x{size[1]}"


def _twins(config, data_format):
    k, s, d, padding, groups, size, cin, cout = config
    kwargs = dict(
        filters=cout,
        kernel_size=k,
        strides=s,
        dilation_rate=d,
        padding=padding,
        groups=groups,
        dtype="float64",
    )
    rot = keras_rotconv.RotConv2D(data_format=data_format, **kwargs)
    # Conv2D runs channels_first only on GPU, so the oracle for
    # channels_first is Conv2D channels_last on transposed tensors.
    builtin = keras.layers.Conv2D(data_format="channels_last", **kwargs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *size, cin))
    builtin.build(x.shape)
    rot.build(x.shape if data_format == "channels_last" else _to_cf(x).shape)
    kernel = rng.standard_normal(builtin.kernel.shape)
    bias = rng.standard_normal(builtin.bias.shape)
    for layer in (rot, builtin):
        layer.kernel.assign(kernel)
        layer.bias.assign(bias)
    return rot, builtin, tf.constant(x)


def _to_cf(x):
    return tf.transpose(x, (0, 3, 1, 2))


def _to_cl(x):
    return tf.transpose(x, (0, 2, 3, 1))


def _apply(layer, x, data_format):
    """The layer on channels-last ``x``, its output channels-last."""
    if data_format == "channels_last":
        return layer(x)
    return _to_cl(layer(_to_cf(x)))


def _gradients(layer, x, data_format, weights):
    """The gradients of ``Σ weights · sin(layer(x))`` and those of a gradient
    penalty, the sum of their squares, with respect to x and the kernel.

    The sine makes the delta depend on x and the kernel, so that the second
    order runs through every argument of both backward rules.
    """
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = _apply(layer, x, data_format)
            loss = tf.reduce_sum(tf.sin(y) * weights)
        first = inner.gradient(loss, [x, layer.kernel, layer.bias])
        penalty = tf.reduce_sum(first[0] ** 2) + tf.reduce_sum(first[1] ** 2)
    second = outer.gradient(penalty, [x, layer.kernel])
    return [y, *first, *second]


def _assert_close(actual, expected, what):
    scale = max(float(tf.reduce_max(tf.abs(expected))), 1e-300)
    error = float(tf.reduce_max(tf.abs(actual - expected))) / scale
    assert error <= FLOAT64_RTOL, f"{what}: relative error {error:.3g}"


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_gradients_match_builtin_conv2d(config, data_format):
    rot, builtin, x = _twins(config, data_format)
    y = builtin(x)
    weights = tf.constant(
        np.random.default_rng(1).standard_normal(y.shape), tf.float64
    )
    names = (
        "output",
        "input gradient",
        "kernel gradient",
        "bias gradient",
        "second-order input gradient",
        "second-order kernel gradient",
    )
    actual = _gradients(rot, x, data_format, weights)
    expected = _gradients(builtin, x, "channels_last", weights)
    for name, a, e in zip(names, actual, expected):
        _assert_close(a, e, name)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_gradient_graph_has_no_conv_gradient_kernels(config):
    rot, _, x = _twins(config, "channels_last")

    weights = tf.ones_like(rot(x))

    @tf.function
    def gradients(x):
        return _gradients(rot, x, "channels_last", weights)

    graph = gradients.get_concrete_function(x).graph.as_graph_def()
    nodes = list(graph.node)
    for function in graph.library.function:
        nodes.extend(function.node_def)
    used = sorted({n.op for n in nodes} & set(FORBIDDEN_OPS))
    assert not used, f"the gradient graph uses {used}"


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("groups", [1, 2])
def test_strided_and_dilated_axis_matches_reference(padding, groups):
    """Axis 0 has stride 2 and dilation 2; axis 1 stride 3 alone."""
    strides, dilation = (2, 3), (2, 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 11, 10, 4))
    w = rng.standard_normal((3, 2, 4 // groups, 6))
    b = rng.standard_normal(6)
    spatial, kernel = x.shape[1:-1], w.shape[:2]
    pairs = ops.padding_pairs(spatial, kernel, strides, dilation, padding)
    z = ops.conv(
        x, w, b, strides=strides, dilation=dilation, pairs=pairs, groups=groups
    )
    expected = reference.forward(x, w, b, strides, dilation, padding, groups)
    _assert_close(z, expected, "forward")
    delta = rng.standard_normal(z.shape)
    _assert_close(
        ops.input_delta(delta, w, spatial, strides, pairs, dilation, groups),
        reference.input_gradient(
            delta, w, x.shape, strides, dilation, padding, groups
        ),
        "input delta",
    )
    _assert_close(
        ops.kernel_gradient(x, delta, kernel, strides, pairs, dilation, groups),
        reference.kernel_gradient(
            x, delta, w.shape, strides, dilation, padding, groups
        ),
        "kernel gradient",
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    "strides, padding", [((2, 3), "same"), ((3, 1), "valid"), ((2, 2), "same")]
)
def test_phases_match_the_spread_rule(strides, padding, groups):
    """``input_delta_by_phases`` equals the textbook full convolution of the
    spread delta, computed here by ``reference.input_gradient``, including a
    kernel shorter than the stride (phases with no taps)."""
    rng = np.random.default_rng(5)
    x_shape = (2, 10, 9, 4)
    for kernel in [(3, 2), (1, 2), (4, 5)]:
        w = rng.standard_normal((*kernel, 4 // groups, 6))
        pairs = ops.padding_pairs(
            x_shape[1:-1], kernel, strides, (1, 1), padding
        )
        z = reference.forward(
            np.zeros(x_shape), w, np.zeros(6), strides, (1, 1), padding, groups
        )
        delta = rng.standard_normal(z.shape)
        _assert_close(
            phase_forms.input_delta_by_phases(
                tf.constant(delta), w, x_shape[1:-1], strides, pairs, groups
            ),
            reference.input_gradient(
                delta, w, x_shape, strides, (1, 1), padding, groups
            ),
            f"input delta, kernel {kernel}",
        )
