"""RotConv2D's gradients against float64 finite differences and the NumPy
transcription of the derivation, which must agree with each other too."""

import keras
import numpy as np
import pytest
from conftest import (
    FD_RTOL,
    FLOAT64_RTOL,
    assert_close,
    gradients,
    numeric_gradient,
    penalty_gradients,
    share_random_weights,
    to_numpy,
)

from keras_rotconv import RotConv2D, reference

CASES = [
    pytest.param(
        dict(filters=3, kernel_size=3, strides=2, padding="same"),
        (1, 5, 6, 2),
        id="stride2-same",
    ),
    pytest.param(
        dict(filters=2, kernel_size=(3, 2), dilation_rate=(2, 1)),
        (2, 6, 5, 2),
        id="dilation21-valid",
    ),
    pytest.param(
        dict(filters=4, kernel_size=2, groups=2, padding="same"),
        (1, 5, 5, 4),
        id="groups2-same",
    ),
    pytest.param(
        dict(filters=4, kernel_size=3, strides=3, groups=2),
        (1, 7, 8, 2),
        id="depthwise-stride3",
    ),
    pytest.param(
        dict(
            filters=4,
            kernel_size=3,
            padding="same",
            data_format="channels_first",
        ),
        (1, 2, 5, 4),
        id="channels-first",
    ),
]


def _layer(config, shape):
    layer = RotConv2D(**config, activation="tanh", dtype="float64")
    layer.build(shape)
    share_random_weights([layer])
    return layer


def _channels_last(config, array):
    if config.get("data_format") == "channels_first":
        return np.moveaxis(array, 1, -1)
    return array


def _reference_gradients(config, layer, x, upstream):
    """``reference.layer_backward`` on channels-last views of the tensors."""
    kernel, bias = (to_numpy(w) for w in layer.weights)
    delta_prev, dkernel, dbias = reference.layer_backward(
        _channels_last(config, x),
        kernel,
        bias,
        _channels_last(config, upstream),
        act_derivative=lambda z: 1 - np.tanh(z) ** 2,
        strides=layer.strides,
        dilation=layer.dilation_rate,
        padding=layer.padding,
        groups=layer.groups,
    )
    if config.get("data_format") == "channels_first":
        delta_prev = np.moveaxis(delta_prev, -1, 1)
    return delta_prev, dkernel, dbias


@pytest.mark.parametrize(("config", "shape"), CASES)
def test_against_finite_differences_and_reference(config, shape):
    layer = _layer(config, shape)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    upstream = rng.standard_normal(layer.compute_output_shape(shape))
    kernel, bias = (to_numpy(w).copy() for w in layer.weights)

    def loss():
        layer.set_weights([kernel, bias])
        return float(np.sum(to_numpy(layer(x)) * upstream))

    numeric = {
        "x": numeric_gradient(loss, x),
        "kernel": numeric_gradient(loss, kernel),
        "bias": numeric_gradient(loss, bias),
    }
    layer.set_weights([kernel, bias])
    _, dx, dvars = gradients(layer, x, upstream)
    ref_dx, ref_dkernel, ref_dbias = _reference_gradients(
        config, layer, x, upstream
    )

    for name, derived, counted in [
        ("x", dx, ref_dx),
        ("kernel", dvars["kernel"], ref_dkernel),
        ("bias", dvars["bias"], ref_dbias),
    ]:
        assert_close(derived, numeric[name], FD_RTOL, f"d/d{name} vs FD")
        assert_close(
            counted, numeric[name], FD_RTOL, f"reference d/d{name} vs FD"
        )
        assert_close(derived, counted, FLOAT64_RTOL, f"d/d{name} vs reference")


def test_channels_first_bias_when_width_equals_filters():
    """Keras's TensorFlow backend can add a channels-first bias along the
    wrong axis when the last spatial size equals ``filters`` (its add guesses
    the layout from shapes). The reference, not Conv2D, is the oracle."""
    config = dict(filters=4, kernel_size=2, data_format="channels_first")
    shape = (2, 3, 5, 5)  # output width 4 == filters
    layer = RotConv2D(**config, dtype="float64")
    layer.build(shape)
    share_random_weights([layer])
    kernel, bias = (to_numpy(w) for w in layer.weights)
    x = np.random.default_rng(3).standard_normal(shape)

    expected = reference.forward(
        np.moveaxis(x, 1, -1), kernel, bias, (1, 1), (1, 1), "valid"
    )
    assert_close(
        to_numpy(layer(x)),
        np.moveaxis(expected, -1, 1),
        FLOAT64_RTOL,
        "channels-first output with bias",
    )


@pytest.mark.parametrize(("config", "shape"), CASES[:4])
def test_gradient_penalty_matches_conv2d(config, shape):
    """Second order: d/dkernel and d/dbias of ||dC/dx||^2. The derived
    backward rules are themselves differentiated (by the same rules)."""
    config = dict(config, activation="tanh", dtype="float64")
    rot = RotConv2D(**config)
    twin = keras.layers.Conv2D(**config)
    rot.build(shape)
    twin.build(shape)
    share_random_weights([rot, twin])
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    upstream = rng.standard_normal(rot.compute_output_shape(shape))

    derived = penalty_gradients(rot, x, upstream)
    expected = penalty_gradients(twin, x, upstream)
    for name in ("kernel", "bias"):
        assert_close(
            derived[name], expected[name], FLOAT64_RTOL, f"d||dC/dx||^2/d{name}"
        )
