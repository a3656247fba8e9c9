"""RotConv2D against keras.layers.Conv2D holding the same weights.

Outputs and the gradients with respect to the input, the kernel and the bias
are compared over a grid of configurations, in float64 and float32. The
built-in layer's gradients come from the backend's own autodiff (on
TensorFlow, ``tf.GradientTape`` through TensorFlow's convolution-gradient
kernels), which RotConv2D never uses.
"""

import itertools
import random

import keras
import numpy as np
import pytest
from conftest import RTOL, assert_close, gradients, share_random_weights

from keras_rotconv import RotConv2D

KERNELS = [1, 2, 3, 5, (3, 2)]
# (strides, dilation_rate): Keras rejects strides > 1 with dilation > 1.
MOTIONS = [
    (1, 1),
    (2, 1),
    (3, 1),
    ((2, 1), 1),
    (1, 2),
    (1, (2, 1)),
]
PADDINGS = ["valid", "same"]
# (groups, input channels, filters); "depthwise" is groups == channels.
GROUPINGS = {"g1": (1, 3, 4), "g2": (2, 4, 6), "depthwise": (3, 3, 6)}
SIZES = ["odd", "even", "barely"]


def _pair(value):
    return value if isinstance(value, tuple) else (value, value)


def _spatial(size, kernel, dilation):
    """Input height and width of the given kind, never smaller than the
    dilated kernel."""
    extent = [(k - 1) * d + 1 for k, d in zip(_pair(kernel), _pair(dilation))]
    if size == "barely":
        # One row more than the kernel spans, and not a column more.
        return (extent[0] + 1, extent[1])
    parity = 1 if size == "odd" else 0
    smallest = (7, 9) if size == "odd" else (8, 6)
    return tuple(n + (n % 2 != parity) for n in map(max, smallest, extent))


def _grid():
    """Every kernel x motion x padding x grouping; data format, batch size,
    input size and activation vary with a fixed seed so that each value of
    each meets many of the others."""
    cases = []
    for kernel, (strides, dilation), padding, grouping in itertools.product(
        KERNELS, MOTIONS, PADDINGS, GROUPINGS
    ):
        draw = random.Random(len(cases))
        groups, channels, filters = GROUPINGS[grouping]
        data_format = draw.choice(["channels_last", "channels_first"])
        batch = draw.choice([1, 3])
        size = draw.choice(SIZES)
        activation = draw.choice([None, "relu", "tanh"])
        config = dict(
            filters=filters,
            kernel_size=kernel,
            strides=strides,
            padding=padding,
            dilation_rate=dilation,
            groups=groups,
            activation=activation,
            data_format=data_format,
        )
        height, width = _spatial(size, kernel, dilation)
        if data_format == "channels_last":
            shape = (batch, height, width, channels)
        else:
            shape = (batch, channels, height, width)
        name = (
            f"k{kernel}-s{strides}-d{dilation}-{padding}-{grouping}-"
            f"{data_format[9:]}-n{batch}-{size}-{activation}"
        ).replace(" ", "")
        cases.append(pytest.param(config, shape, id=name))
    return cases


GRID = _grid()


def _to_last(x):
    return np.moveaxis(x, 1, -1)


def _to_first(x):
    return np.moveaxis(x, -1, 1)


def twin_gradients(twin, x, upstream, data_format):
    """The built-in layer's results in ``data_format``. Conv2D cannot run
    channels-first on TensorFlow's CPU kernels, so the twin is always
    channels-last and channels-first tensors are transposed around it: the
    same convolution, computed by an independent path."""
    if data_format == "channels_last":
        return gradients(twin, x, upstream)
    y, dx, dvars = gradients(twin, _to_last(x), _to_last(upstream))
    return _to_first(y), _to_first(dx), dvars


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("config", "shape"), GRID)
def test_matches_conv2d(config, shape, dtype):
    rot = RotConv2D(**config, dtype=dtype)
    rot.build(shape)
    twin = keras.layers.Conv2D(
        **dict(config, data_format="channels_last"), dtype=dtype
    )
    if config["data_format"] == "channels_first":
        twin.build((shape[0], *shape[2:], shape[1]))
    else:
        twin.build(shape)
    share_random_weights([rot, twin])

    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    out_shape = tuple(rot.compute_output_shape(shape))
    upstream = rng.standard_normal(out_shape).astype(dtype)

    y, dx, dvars = gradients(rot, x, upstream)
    y_ref, dx_ref, dvars_ref = twin_gradients(
        twin, x, upstream, config["data_format"]
    )
    rtol = RTOL[dtype]
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, y_ref, rtol, "output")
    assert_close(dx, dx_ref, rtol, "input delta dC/dx")
    assert_close(dvars["kernel"], dvars_ref["kernel"], rtol, "dC/dkernel")
    assert_close(dvars["bias"], dvars_ref["bias"], rtol, "dC/dbias")


def test_grid_covers_every_listed_value():
    """The seeded draws above must not leave a value of the issue's grid
    unused (a guard against an unlucky seed after edits)."""
    ids = [case.id for case in GRID]
    for needle in ["channels_last", "channels_first"]:
        assert any(needle[9:] in i for i in ids), needle
    for needle in [
        "-n1-",
        "-n3-",
        "-odd-",
        "-even-",
        "-barely-",
        "-None",
        "-relu",
        "-tanh",
    ]:
        assert any(needle in i for i in ids), needle
    assert len(GRID) == (
        len(KERNELS) * len(MOTIONS) * len(PADDINGS) * len(GROUPINGS)
    )
