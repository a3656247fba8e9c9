"""RotConv1D/2D/3D gradients against float64 finite differences and the
NumPy transcription of the derivation, which must agree with each other
too."""

import numpy as np
import pytest
from conftest import (
    FD_RTOL,
    FLOAT64_RTOL,
    LAYERS,
    assert_close,
    gradients,
    make_twins,
    numeric_gradient,
    penalty_gradients,
    share_random_weights,
    to_numpy,
)

from keras_rotconv import reference

CASES = [
    pytest.param(
        dict(filters=3, kernel_size=3, strides=2, padding="same"),
        (1, 5, 6, 2),
        id="2d-stride2-same",
    ),
    pytest.param(
        dict(filters=2, kernel_size=(3, 2), dilation_rate=(2, 1)),
        (2, 6, 5, 2),
        id="2d-dilation21-valid",
    ),
    pytest.param(
        dict(filters=4, kernel_size=2, groups=2, padding="same"),
        (1, 5, 5, 4),
        id="2d-groups2-same",
    ),
    pytest.param(
        dict(filters=4, kernel_size=3, strides=3, groups=2),
        (1, 7, 8, 2),
        id="2d-depthwise-stride3",
    ),
    pytest.param(
        dict(filters=3, kernel_size=3, dilation_rate=2, padding="causal"),
        (2, 9, 2),
        id="1d-causal-dilation2",
    ),
    pytest.param(
        dict(filters=4, kernel_size=2, strides=3, padding="same", groups=2),
        (1, 10, 4),
        id="1d-stride3-same-groups2",
    ),
    pytest.param(
        dict(filters=3, kernel_size=(2, 3, 2), strides=(2, 1, 2)),
        (1, 5, 4, 5, 2),
        id="3d-stride212-valid",
    ),
    pytest.param(
        dict(
            filters=4,
            kernel_size=2,
            dilation_rate=(1, 2, 1),
            padding="same",
            groups=2,
        ),
        (1, 4, 5, 3, 2),
        id="3d-dilation121-same-depthwise",
    ),
    pytest.param(
        dict(
            filters=4,
            kernel_size=3,
            padding="same",
            data_format="channels_first",
        ),
        (1, 2, 5, 4),
        id="2d-channels-first",
    ),
    pytest.param(
        dict(
            filters=2,
            kernel_size=3,
            strides=2,
            padding="causal",
            data_format="channels_first",
        ),
        (2, 3, 8),
        id="1d-causal-channels-first",
    ),
    pytest.param(
        dict(
            filters=2,
            kernel_size=(2, 2, 1),
            padding="same",
            data_format="channels_first",
        ),
        (1, 2, 3, 4, 3),
        id="3d-channels-first",
    ),
]


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _layer(config, shape):
    # Sigmoid keeps float64 on every backend (on JAX Keras computes tanh of
    # float64 in float32), and its derivative makes the input delta depend
    # on z.
    rot_class, _ = LAYERS[len(shape) - 2]
    layer = rot_class(
        **config,
        activation="sigmoid",
        dtype="float64",
        kernel_initializer="zeros",  # replaced below, and fast on JAX
    )
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
        act_derivative=lambda z: _sigmoid(z) * (1 - _sigmoid(z)),
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
        y = to_numpy(layer(x))
        assert y.dtype == "float64", y.dtype
        return float(np.sum(y * upstream))

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


@pytest.mark.parametrize("rank", sorted(LAYERS))
def test_channels_first_bias_when_width_equals_filters(rank):
    """Keras's TensorFlow backend can add a channels-first bias along the
    wrong axis when the last spatial size equals ``filters`` (its add guesses
    the layout from shapes). The reference, not the built-in layer, is the
    oracle."""
    config = dict(filters=4, kernel_size=2, data_format="channels_first")
    shape = (2, 3, *(5,) * rank)  # output width 4 == filters
    rot_class, _ = LAYERS[rank]
    layer = rot_class(**config, dtype="float64", kernel_initializer="zeros")
    layer.build(shape)
    share_random_weights([layer])
    kernel, bias = (to_numpy(w) for w in layer.weights)
    x = np.random.default_rng(3).standard_normal(shape)

    expected = reference.forward(
        np.moveaxis(x, 1, -1), kernel, bias, (1,) * rank, (1,) * rank, "valid"
    )
    assert_close(
        to_numpy(layer(x)),
        np.moveaxis(expected, -1, 1),
        FLOAT64_RTOL,
        "channels-first output with bias",
    )


@pytest.mark.parametrize(("config", "shape"), CASES[:8])
def test_gradient_penalty_matches_builtin(config, shape):
    """Second order: d/dkernel and d/dbias of ||dC/dx||^2. The derived
    backward rules are themselves differentiated (by the same rules)."""
    config = dict(config, activation="sigmoid", dtype="float64")
    rot, twin = make_twins(*LAYERS[len(shape) - 2], config, shape)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    upstream = rng.standard_normal(rot.compute_output_shape(shape))

    derived = penalty_gradients(rot, x, upstream)
    expected = penalty_gradients(twin, x, upstream)
    for name in ("kernel", "bias"):
        assert_close(
            derived[name], expected[name], FLOAT64_RTOL, f"d||dC/dx||^2/d{name}"
        )
