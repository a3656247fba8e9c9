"""keras_rotconv.convert on keras.applications models and a U-Net: the
converted model computes the same outputs and the same gradients (input and
every trainable weight) as the original, in float64, through the derived
rules only.

The applications are heavy: each is built with ``weights=None`` at the
smallest input it accepts, batch 1. All five run on TensorFlow (the
fastest backend here); torch runs MobileNetV2 and the U-Net, JAX the U-Net
(see EXTRA).
"""

import warnings

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    FLOAT64_RTOL,
    TF_CONV_GRADIENTS,
    assert_close,
    jax_equations,
    to_numpy,
)

import keras_rotconv as kr
from keras_rotconv.convert import TWINS

APPLICATIONS = {
    "ResNet50": (keras.applications.ResNet50, (32, 32, 3)),
    "MobileNetV2": (keras.applications.MobileNetV2, (32, 32, 3)),
    "EfficientNetB0": (keras.applications.EfficientNetB0, (32, 32, 3)),
    "Xception": (keras.applications.Xception, (71, 71, 3)),
    "ConvNeXtTiny": (keras.applications.ConvNeXtTiny, (32, 32, 3)),
}
# Beyond TensorFlow: the U-Net everywhere, MobileNetV2 (standalone
# depthwise convolutions) on torch; under JAX its compiled gradient takes
# over a minute, and the depthwise twin has its own tests there.
EXTRA = {"jax": {"unet"}, "torch": {"MobileNetV2", "unet"}}


@pytest.fixture
def float64():
    """Models built in float64. Both settings: with floatx alone, layers
    built after another test's may keep a float32 policy (seen on
    Conv2DTranspose in the U-Net after any model had been built)."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def unet(shape=(32, 32, 3), classes=3):
    """The keras.io image-segmentation U-Net ("Image segmentation with a
    U-Net-like architecture"), narrower: separable convolutions down,
    transposed convolutions and UpSampling2D up, residual 1x1 convolutions
    across."""
    layers = keras.layers
    inputs = keras.Input(shape)
    x = layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    x = layers.Activation("relu")(layers.BatchNormalization()(x))
    previous = x
    for filters in (16, 32):
        for _ in range(2):
            x = layers.Activation("relu")(x)
            x = layers.SeparableConv2D(filters, 3, padding="same")(x)
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        residual = layers.Conv2D(filters, 1, strides=2, padding="same")(
            previous
        )
        x = previous = layers.add([x, residual])
    for filters in (32, 16, 8):
        for _ in range(2):
            x = layers.Activation("relu")(x)
            x = layers.Conv2DTranspose(filters, 3, padding="same")(x)
            x = layers.BatchNormalization()(x)
        x = layers.UpSampling2D(2)(x)
        residual = layers.UpSampling2D(2)(previous)
        residual = layers.Conv2D(filters, 1, padding="same")(residual)
        x = previous = layers.add([x, residual])
    outputs = layers.Conv2D(classes, 3, activation="softmax", padding="same")(x)
    return keras.Model(inputs, outputs, name="unet")


def build(name):
    if name == "unet":
        return unet(), (32, 32, 3)
    constructor, shape = APPLICATIONS[name]
    return constructor(weights=None, input_shape=shape, classes=4), shape


def model_gradients(model, x, upstream):
    """``(y, dC/dx, [dC/dw for each trainable weight])`` for ``C = Σ y ·
    upstream``, inference mode, by the backend's own autodiff."""
    variables = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
            loss = tf.reduce_sum(y * upstream)
        dx, *grads = tape.gradient(loss, [x, *variables])
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        frozen = [v.value for v in model.non_trainable_variables]

        def loss(trainable, x):
            y, _ = model.stateless_call(trainable, frozen, x, training=False)
            return jnp.sum(y * upstream), y

        (_, y), (grads, dx) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        )([v.value for v in variables], jnp.asarray(x))
    else:
        import torch

        x = torch.tensor(x, requires_grad=True)
        y = model(x, training=False)
        (y * torch.as_tensor(upstream)).sum().backward()
        dx, grads = x.grad, [v.value.grad for v in variables]
    return to_numpy(y), to_numpy(dx), [to_numpy(g) for g in grads]


# Keras's torch BatchNormalization computes float64 with float32 accuracy
# (Keras 3.15, torch 2.13, inference mode, one layer alone against the
# formula: output 7e-8, gamma gradient 1e-7 relative). Inputs equal to 1e-16
# can then round to float32 neighbours: the two U-Nets' gamma and beta
# gradients differ by ~1.5e-7 while every other gradient agrees to 2e-15.
TORCH_BATCH_NORM_RTOL = 1e-6


def _rtol(path):
    if BACKEND == "torch" and "batch_normalization" in path:
        return TORCH_BATCH_NORM_RTOL
    return FLOAT64_RTOL


def _kinds(model):
    return {type(layer) for layer in _all_layers(model)}


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


APPLICATION_CASES = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            BACKEND != "tensorflow" and name not in EXTRA.get(BACKEND, ()),
            reason="heavy: TensorFlow only",
        ),
    )
    for name in [*APPLICATIONS, "unet"]
]


@pytest.mark.parametrize("name", APPLICATION_CASES)
def test_converted_model_has_the_same_outputs_and_gradients(name, float64):
    model, shape = build(name)
    converted = kr.convert(model)
    report = converted.rotconv_report
    assert report.converted and not report.not_converted
    kinds = _kinds(converted)
    assert not kinds & set(TWINS), "a built-in convolution is left"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *shape))
    upstream = rng.standard_normal(model.output_shape[1:])[None]
    y, dx, grads = model_gradients(converted, x, upstream)
    y_ref, dx_ref, grads_ref = model_gradients(model, x, upstream)
    assert_close(y, y_ref, FLOAT64_RTOL, f"{name} output")
    assert_close(dx, dx_ref, FLOAT64_RTOL, f"{name} dC/dx")
    assert len(grads) == len(grads_ref)
    paths = [v.path for v in model.trainable_variables]
    for path, grad, grad_ref in zip(paths, grads, grads_ref):
        assert_close(grad, grad_ref, _rtol(path), f"{name} {path}")
    found = _FRAMEWORK_GRADIENTS[BACKEND](converted, shape)
    assert not found, sorted(found)[:5]


def _tf_framework_gradients(model, shape):
    return _tf_gradient_ops(model, shape) & TF_CONV_GRADIENTS


def _torch_framework_gradients(model, shape):
    """torch's convolution backward nodes in the autograd graph of the
    loss (the second-order graphs are checked per layer in
    test_family.py; for a whole MobileNetV2 they take minutes)."""
    import torch

    x = torch.zeros((1, *shape), dtype=torch.float64, requires_grad=True)
    loss = torch.sin(model(x, training=False)).sum()
    stack, seen, found = [loss.grad_fn], set(), set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return found & {"ConvolutionBackward0", "ConvolutionBackwardBackward0"}


def _jax_framework_gradients(model, shape):
    """Convolutions of an input dilated by the strides (JAX's own input
    gradient of a strided convolution) in the gradient program."""
    import jax
    import jax.numpy as jnp

    frozen = [v.value for v in model.non_trainable_variables]

    def loss(trainable, x):
        y, _ = model.stateless_call(trainable, frozen, x, training=True)
        return jnp.sum(jnp.sin(y))

    program = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
        [v.value for v in model.trainable_variables],
        jnp.zeros((1, *shape)),
    )
    return {
        str(eqn.params["lhs_dilation"])
        for eqn in jax_equations(program)
        if eqn.primitive.name == "conv_general_dilated"
        and any(d != 1 for d in eqn.params["lhs_dilation"])
    }


def _tf_gradient_ops(model, shape):
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, [x, *model.trainable_variables])

    graph = step.get_concrete_function(
        tf.TensorSpec((1, *shape), tf.float64)
    ).graph.as_graph_def()
    types = {node.op for node in graph.node}
    for function in graph.library.function:
        types |= {node.op for node in function.node_def}
    return types


_FRAMEWORK_GRADIENTS = {
    "tensorflow": _tf_framework_gradients,
    "torch": _torch_framework_gradients,
    "jax": _jax_framework_gradients,
}


def test_nested_and_shared_layers(float64):
    """A convolution inside a nested Sequential model is converted, and a
    convolution shared by two branches is one twin, still shared."""
    shared = keras.layers.Conv2D(3, 3, padding="same", name="shared")
    stem = keras.Sequential(
        [keras.layers.Conv2D(3, 2, strides=2, name="inner")], name="stem"
    )
    inputs = keras.Input((8, 8, 3))
    a = shared(stem(inputs))
    b = shared(keras.layers.AveragePooling2D(2)(inputs))
    model = keras.Model(inputs, keras.layers.add([a, b]))
    converted = kr.convert(model)
    names = {layer.name: layer for layer in _all_layers(converted)}
    assert type(names["shared"]) is kr.RotConv2D
    assert type(names["inner"]) is kr.RotConv2D
    assert len(names["shared"]._inbound_nodes) == 2
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    assert_close(
        to_numpy(converted(x)), to_numpy(model(x)), FLOAT64_RTOL, "output"
    )


@keras.saving.register_keras_serializable(package="keras_rotconv_tests")
class OwnConvolution(keras.layers.Layer):
    """A layer that creates a convolution in its own code, where cloning
    cannot reach it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(2, 3, padding="same", name="hidden")

    def call(self, x):
        return self.conv(x)


def test_unreachable_convolution_is_reported():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(2, 1, name="reachable")(inputs)
    model = keras.Model(inputs, OwnConvolution(name="own")(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = kr.convert(model)
    report = converted.rotconv_report
    assert [entry[0] for entry in report.converted] == ["reachable"]
    assert len(report.not_converted) == 1
    assert report.not_converted[0].endswith("own/hidden")
    assert any("own/hidden" in str(w.message) for w in caught)


def test_converted_model_trains_saves_and_loads(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.Sequential([keras.layers.Conv2D(4, 3)], name="nested"),
            keras.layers.DepthwiseConv2D(3, padding="same"),
            keras.layers.Conv2DTranspose(2, 2, strides=2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    converted = kr.convert(model)
    converted.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8, 2)).astype("float32")
    y = rng.standard_normal((8, 2)).astype("float32")
    history = converted.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    path = tmp_path / "converted.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert _kinds(loaded) >= {kr.RotConv2D, kr.RotDepthwiseConv2D}
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(converted(x)), rtol=1e-6, atol=1e-6
    )


def test_command_line_convert(tmp_path, capsys):
    from keras_rotconv.tools import cli

    model = keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.SeparableConv2D(3, 3)]
    )
    source, target = tmp_path / "in.keras", tmp_path / "out.keras"
    model.save(source)
    assert cli.main(["convert", str(source), str(target)]) == 0
    assert "SeparableConv2D -> RotSeparableConv2D" in capsys.readouterr().out
    loaded = keras.saving.load_model(target)
    assert type(loaded.layers[0]) is kr.RotSeparableConv2D
    x = np.random.default_rng(0).standard_normal((1, 6, 6, 2))
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )


def test_command_line_convert_exits_1_naming_what_it_left(tmp_path, capsys):
    from keras_rotconv.tools import cli

    inputs = keras.Input((6, 6, 2))
    model = keras.Model(inputs, OwnConvolution(name="own")(inputs))
    source, target = tmp_path / "in.keras", tmp_path / "out.keras"
    model.save(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["convert", str(source), str(target)]) == 1
    assert "own/hidden" in capsys.readouterr().err
    assert target.exists()


class _SubclassedModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(2, 3)

    def call(self, x):
        return self.conv(x)


def test_subclassed_model_raises_value_error():
    model = _SubclassedModel()
    model(np.zeros((1, 5, 5, 2)))
    with pytest.raises(ValueError, match="Functional"):
        kr.convert(model)
