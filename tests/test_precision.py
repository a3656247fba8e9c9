"""RotConv2D under Keras's mixed precision policies: float16 or bfloat16
arithmetic with float32 variables, like Conv2D; gradients as accurate as the
half type allows; and the MNIST-like model trained with loss scaling
(float16) or without (bfloat16)."""

import keras
import mnist_like
import numpy as np
import pytest
from conftest import BACKEND, assert_close, to_numpy

from keras_rotconv import RotConv2D

if BACKEND != "tensorflow":
    pytest.skip(
        "mixed precision is checked on TensorFlow's CPU kernels",
        allow_module_level=True,
    )

import tensorflow as tf

POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
# Unit roundoff: half the distance from 1 to the next number of the type.
UNIT_ROUNDOFF = {"mixed_float16": 2.0**-11, "mixed_bfloat16": 2.0**-8}
# One layer's output and gradients, relative to their largest entry: the
# input, the kernel and the upstream delta are each rounded once to the half
# type and each result once more (the kernels and the bias sum accumulate
# in float32), so about 4 roundings of u each; 8u allows them to add up.
LAYER_RTOL = {policy: 8 * u for policy, u in UNIT_ROUNDOFF.items()}
# Trained weights against float32 training, relative to how far float32
# training moved them: each of the steps' gradients carries a few u, as
# above; the update sums a dozen momentum-weighted steps, each taken at
# weights that earlier errors moved: 4 times the one-layer bound.
TRAINING_RTOL = {policy: 4 * rtol for policy, rtol in LAYER_RTOL.items()}
CONV_OPS = {"Conv2D", "Conv"}
# Under mixed_bfloat16, TensorFlow's filter- and bias-gradient kernels sum
# in bfloat16: with many output positions Conv2D's kernel gradient is off by
# several u and its bias gradient by tens of percent, so only float64 judges
# these two.
NOT_AN_ORACLE = {"mixed_bfloat16": ("dC/dkernel", "dC/dbias")}

LAYER_CASES = {
    "stride2-same": (
        dict(filters=8, kernel_size=3, strides=2, padding="same"),
        (4, 12, 12, 4),
    ),
    "dilation2-groups2": (
        dict(filters=8, kernel_size=3, dilation_rate=2, groups=2),
        (4, 12, 12, 4),
    ),
    # 8192 terms in each bias gradient: summed in float16, they came out
    # tens of percent too small.
    "many-positions": (dict(filters=4, kernel_size=1), (8, 32, 32, 2)),
    # 8192 products in each entry of a depthwise kernel gradient.
    "many-positions-depthwise": (
        dict(filters=4, kernel_size=3, groups=2, padding="same"),
        (8, 32, 32, 2),
    ),
}


def _conv_op_dtypes(concrete_function):
    """The element types of every convolution in a traced function."""
    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    return {
        tf.dtypes.as_dtype(node.attr["T"].type).name
        for node in nodes
        if node.op in CONV_OPS
    }


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_computes_in_half_precision_with_float32_variables(policy):
    """As Conv2D does: float32 variables, cast to the half type for the
    call, every convolution of the forward and backward pass in the half
    type, and float32 gradients for the variables."""
    half = POLICIES[policy]
    layers = {
        "RotConv2D": RotConv2D(4, 3, strides=2, dtype=policy),
        "Conv2D": keras.layers.Conv2D(4, 3, strides=2, dtype=policy),
    }
    x = tf.random.stateless_normal((2, 9, 9, 3), seed=(0, 0))
    for name, layer in layers.items():
        layer.build(x.shape)

        @tf.function
        def step(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
            return y, tape.gradient(loss, [x, *layer.trainable_variables])

        y, grads = step(x)
        assert layer.compute_dtype == half, name
        assert layer.variable_dtype == "float32", name
        assert [v.dtype for v in layer.weights] == ["float32"] * 2, name
        assert y.dtype == half, name
        assert [g.dtype.name for g in grads] == ["float32"] * 3, name
        dtypes = _conv_op_dtypes(step.get_concrete_function(x))
        assert dtypes == {half}, f"{name} convolves in {dtypes}"


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_gradients_within_half_precision(name, policy):
    """Against Conv2D in float64 (accuracy) and Conv2D under the same
    policy (parity), both within ``LAYER_RTOL``; except where the built-in
    layer is itself further off than that (``NOT_AN_ORACLE``)."""
    config, shape = LAYER_CASES[name]
    layers = {
        "rot": RotConv2D(**config, dtype=policy),
        "twin": keras.layers.Conv2D(**config, dtype=policy),
        "float64": keras.layers.Conv2D(**config, dtype="float64"),
    }
    rng = np.random.default_rng(0)
    for layer in layers.values():
        layer.build(shape)
    weights = [
        rng.standard_normal(w.shape) * 0.5 for w in layers["rot"].weights
    ]
    x = rng.standard_normal(shape)
    # Not centred, so that the bias gradient's terms do not cancel.
    upstream = 0.3 + rng.standard_normal(
        layers["rot"].compute_output_shape(shape)
    )
    results = {}
    for key, layer in layers.items():
        layer.set_weights(weights)
        dtype = "float64" if key == "float64" else "float32"
        xt = tf.constant(x, dtype=dtype)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = tf.cast(layer(xt), dtype)
            loss = tf.reduce_sum(y * tf.constant(upstream, dtype=dtype))
        grads = tape.gradient(loss, [xt, *layer.trainable_variables])
        results[key] = [to_numpy(t) for t in [y, *grads]]

    rtol = LAYER_RTOL[policy]
    for i, what in enumerate(["output", "dC/dx", "dC/dkernel", "dC/dbias"]):
        mine = results["rot"][i]
        assert np.all(np.isfinite(mine)), what
        assert_close(mine, results["float64"][i], rtol, f"{what} vs float64")
        if what in NOT_AN_ORACLE.get(policy, ()):
            continue
        assert_close(mine, results["twin"][i], rtol, f"{what} vs Conv2D")


def _optimizer(policy):
    sgd = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    if policy == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(sgd)
    return sgd


def _train(conv, policy, weights, x, y):
    model = mnist_like.model(conv, dtype=policy)
    model.set_weights(weights)
    model.compile(
        optimizer=_optimizer(policy),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return model, history.history["loss"]


def _unscaled_gradients(model, x, y):
    """The gradients one step would apply, as the optimizer computes them:
    the loss scaled up before differentiating, the gradients scaled down."""
    optimizer = model.optimizer
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
        scaled = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, model.trainable_variables)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        grads = [g / optimizer.dynamic_scale for g in grads]
    return [to_numpy(g) for g in grads]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_mnist_like_model_trains_under_policy(policy):
    weights = mnist_like.initial_weights()
    x, y = mnist_like.data(64)
    reference, _ = _train(keras.layers.Conv2D, "float32", weights, x, y)
    rot, rot_losses = _train(RotConv2D, policy, weights, x, y)
    twin, twin_losses = _train(keras.layers.Conv2D, policy, weights, x, y)

    assert all(np.isfinite(rot_losses)) and rot_losses[-1] < rot_losses[0]
    gradients = _unscaled_gradients(rot, x[:16], y[:16])
    assert all(np.all(np.isfinite(g)) for g in gradients)
    if policy == "mixed_float16":
        # The same steps skipped for overflow (none, at these scales) and
        # the same loss scale at the end.
        for attribute in ("iterations", "dynamic_scale"):
            assert float(getattr(rot.optimizer, attribute)) == float(
                getattr(twin.optimizer, attribute)
            ), attribute
        assert int(rot.optimizer.inner_optimizer.iterations) == int(
            rot.optimizer.iterations
        )
    assert_close(rot_losses, twin_losses, LAYER_RTOL[policy], "loss curve")
    # Conv2D is not the oracle for the weights (``NOT_AN_ORACLE``): under
    # mixed_bfloat16 its biases drift by a large fraction of their update
    # away from float32 training.
    rtol = TRAINING_RTOL[policy]
    for mine, expected, initial in zip(
        rot.get_weights(), reference.get_weights(), weights, strict=True
    ):
        update = np.max(np.abs(expected - initial))
        error = np.max(np.abs(mine - expected)) / update
        assert update > 0
        assert error <= rtol, f"{error:.2e} of the update > {rtol:.2e}"
