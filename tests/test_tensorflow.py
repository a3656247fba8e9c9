"""TensorFlow-specific guarantees: the gradient graph holds none of
TensorFlow's convolution-gradient kernels, and unknown spatial sizes work
inside tf.function. (test_backends.py has the JAX and torch counterparts.)"""

import pytest
from conftest import (
    BACKEND,
    FLOAT64_RTOL,
    LAYERS,
    TF_CONV_GRADIENTS,
    assert_close,
    make_twins,
    tf_gradient_graph_ops,
    to_numpy,
)

if BACKEND != "tensorflow":
    pytest.skip(
        "tf.function graphs exist only on the TensorFlow backend",
        allow_module_level=True,
    )

import numpy as np
import tensorflow as tf

# TensorFlow runs 1D convolutions as 2D ones.
FORWARD_OPS = {"Conv2D", "Conv3D", "Conv", "DepthwiseConv2dNative"}

# (rank, name): (config, input shape)
CONFIGS = {
    (2, "stride2-same"): (
        dict(filters=4, kernel_size=3, strides=2, padding="same"),
        (2, 9, 8, 4),
    ),
    (2, "dilation2"): (
        dict(filters=4, kernel_size=3, dilation_rate=2),
        (2, 9, 8, 4),
    ),
    (2, "groups2"): (
        dict(filters=4, kernel_size=(3, 2), groups=2),
        (2, 9, 8, 4),
    ),
    (2, "depthwise"): (
        dict(filters=4, kernel_size=3, groups=4, strides=(2, 1)),
        (2, 9, 8, 4),
    ),
    (2, "channels-first"): (
        dict(filters=4, kernel_size=2, data_format="channels_first"),
        (2, 4, 9, 8),
    ),
    (1, "causal-stride2"): (
        dict(filters=4, kernel_size=3, strides=2, padding="causal"),
        (2, 9, 4),
    ),
    (1, "dilation2-groups2"): (
        dict(filters=4, kernel_size=2, dilation_rate=2, groups=2),
        (2, 9, 4),
    ),
    (3, "stride212-same"): (
        dict(filters=4, kernel_size=2, strides=(2, 1, 2), padding="same"),
        (2, 5, 6, 5, 4),
    ),
    (3, "dilation121-groups2"): (
        dict(filters=4, kernel_size=2, dilation_rate=(1, 2, 1), groups=2),
        (2, 5, 6, 5, 4),
    ),
}


@pytest.mark.parametrize(
    ("rank", "name"),
    sorted(CONFIGS),
    ids=[f"{r}d-{n}" for r, n in sorted(CONFIGS)],
)
def test_gradient_graph_has_no_conv_backprop_ops(rank, name):
    config, shape = CONFIGS[rank, name]
    rot, twin = make_twins(*LAYERS[rank], config, shape)
    rot_ops = tf_gradient_graph_ops(rot, shape)
    assert not rot_ops & TF_CONV_GRADIENTS, sorted(rot_ops & TF_CONV_GRADIENTS)
    assert rot_ops & FORWARD_OPS
    if "first" not in name:
        # The same graph for the built-in layer does use them, which shows
        # the check above can see them. (The built-in layer cannot run
        # channels-first on TensorFlow's CPU kernels.)
        twin_ops = tf_gradient_graph_ops(twin, shape)
        assert twin_ops & TF_CONV_GRADIENTS


GRAPH_CONFIGS = {
    # The phase split of a strided axis.
    "stride2-same": dict(strides=2, padding="same"),
    # One phase: on TensorFlow's 1D and 3D convolutions the kernel
    # gradient pads the rows itself, ordered after the delta.
    "stride1-same": dict(strides=1, padding="same"),
    "dilation2-valid": dict(dilation_rate=2, padding="valid"),
}


@pytest.mark.parametrize("config_name", sorted(GRAPH_CONFIGS))
@pytest.mark.parametrize("rank", sorted(LAYERS))
def test_unknown_spatial_sizes_in_tf_function(rank, config_name):
    config = dict(
        filters=4, kernel_size=3, dtype="float64", **GRAPH_CONFIGS[config_name]
    )
    rot, twin = make_twins(*LAYERS[rank], config, (None, *(None,) * rank, 3))
    spec = tf.TensorSpec([None, *(None,) * rank, 3], tf.float64)

    def trace(layer):
        @tf.function(input_signature=[spec])
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * tf.cos(y))
            return [y, *tape.gradient(loss, [x, *layer.trainable_variables])]

        return step

    rot_step, twin_step = trace(rot), trace(twin)
    rng = np.random.default_rng(0)
    for sizes in [(2, 9, 6, 4), (1, 4, 5, 3), (3, 11, 11, 5)]:
        shape = (sizes[0], *sizes[1 : rank + 1], 3)
        x = tf.constant(rng.standard_normal(shape))
        try:
            theirs = [to_numpy(t) for t in twin_step(x)]
        except tf.errors.InvalidArgumentError:
            # TensorFlow's dilated 3D convolution refuses an input smaller
            # than the kernel on two axes; the forward pass is the same op.
            with pytest.raises(tf.errors.InvalidArgumentError):
                rot_step(x)
            continue
        mine = rot_step(x)
        if theirs[0].size == 0:
            # The input is smaller than the dilated kernel: the output is
            # empty and every gradient a sum of no terms. The built-in
            # layer is no oracle here: its kernel gradient (through
            # TensorFlow's dilated convolution) returns whatever its
            # buffer held, the previous call's values in 2D and in 3D
            # arbitrary numbers, from the first call on.
            theirs = [np.zeros_like(t) for t in theirs]
        for name, a, b in zip(
            ["y", "dx", "dkernel", "dbias"], mine, theirs, strict=True
        ):
            assert_close(to_numpy(a), b, FLOAT64_RTOL, f"{name} at {shape}")
