"""TensorFlow-specific guarantees: the gradient graph holds none of
TensorFlow's convolution-gradient kernels, and unknown spatial sizes work
inside tf.function."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, FLOAT64_RTOL, assert_close, make_twins, to_numpy

from keras_rotconv import RotConv2D

if BACKEND != "tensorflow":
    pytest.skip("TensorFlow graphs only", allow_module_level=True)

import tensorflow as tf

BACKPROP_OPS = {
    "Conv2DBackpropInput",
    "Conv2DBackpropInputV2",
    "Conv2DBackpropFilter",
    "Conv2DBackpropFilterV2",
    "DepthwiseConv2dNativeBackpropInput",
    "DepthwiseConv2dNativeBackpropFilter",
}

CONFIGS = {
    "stride2-same": dict(filters=4, kernel_size=3, strides=2, padding="same"),
    "dilation2": dict(filters=4, kernel_size=3, dilation_rate=2),
    "groups2": dict(filters=4, kernel_size=(3, 2), groups=2),
    "depthwise": dict(filters=4, kernel_size=3, groups=4, strides=(2, 1)),
    "channels-first": dict(
        filters=4, kernel_size=2, data_format="channels_first"
    ),
}


def op_types(concrete_function):
    """Every op type in the function's graph and in the functions it calls."""
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types |= {node.op for node in function.node_def}
    return types


def first_and_second_order_graph(layer, shape):
    @tf.function
    def step(x):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.sin(layer(x)))
            dx, *dvars = inner.gradient(loss, [x, *layer.trainable_variables])
            penalty = tf.reduce_sum(dx**2)
        return dvars, outer.gradient(penalty, layer.trainable_variables)

    return step.get_concrete_function(tf.TensorSpec(shape, tf.float32))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_graph_has_no_conv_backprop_ops(name):
    shape = (2, 9, 8, 4) if "first" not in name else (2, 4, 9, 8)
    rot, twin = make_twins(RotConv2D, keras.layers.Conv2D, CONFIGS[name], shape)
    rot_ops = op_types(first_and_second_order_graph(rot, shape))
    assert not rot_ops & BACKPROP_OPS, sorted(rot_ops & BACKPROP_OPS)
    assert rot_ops & {"Conv2D", "Conv", "DepthwiseConv2dNative"}
    if "first" not in name:
        # The same graph for the built-in layer does use them, which shows
        # the check above can see them.
        twin_ops = op_types(first_and_second_order_graph(twin, shape))
        assert twin_ops & BACKPROP_OPS


@pytest.mark.parametrize(
    "shapes", [[(2, 9, 6, 3), (1, 4, 5, 3), (3, 11, 11, 3)]], ids=["three"]
)
def test_unknown_spatial_sizes_in_tf_function(shapes):
    config = dict(
        filters=4, kernel_size=3, strides=2, padding="same", dtype="float64"
    )
    rot, twin = make_twins(
        RotConv2D, keras.layers.Conv2D, config, (None, None, None, 3)
    )

    def trace(layer):
        @tf.function(
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float64)]
        )
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * tf.cos(y))
            return [y, *tape.gradient(loss, [x, *layer.trainable_variables])]

        return step

    rot_step, twin_step = trace(rot), trace(twin)
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = tf.constant(rng.standard_normal(shape))
        for name, mine, theirs in zip(
            ["y", "dx", "dkernel", "dbias"],
            rot_step(x),
            twin_step(x),
            strict=True,
        ):
            assert_close(
                to_numpy(mine),
                to_numpy(theirs),
                FLOAT64_RTOL,
                f"{name} at {shape}",
            )
