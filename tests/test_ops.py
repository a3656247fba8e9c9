"""The pieces of the derivation in keras_rotconv.ops, for 1, 2 and 3
spatial axes, against NumPy and keras_rotconv.reference."""

import numpy as np
import pytest
from conftest import (
    FD_RTOL,
    FLOAT64_RTOL,
    assert_close,
    numeric_gradient,
    to_numpy,
)

from keras_rotconv import ops, reference


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "padding", "expected"),
    [
        (7, 3, 1, 1, "valid", (0, 0)),
        (7, 3, 1, 1, "same", (1, 1)),
        (7, 3, 2, 1, "same", (1, 1)),
        (8, 3, 2, 1, "same", (0, 1)),
        (8, 2, 1, 1, "same", (0, 1)),
        (9, 3, 1, 2, "same", (2, 2)),
        (5, 1, 3, 1, "same", (0, 0)),
        (6, 3, 1, 2, "causal", (4, 0)),
    ],
)
def test_padding_pairs(size, kernel, stride, dilation, padding, expected):
    pairs = ops.padding_pairs([size], [kernel], [stride], [dilation], padding)
    assert pairs == (expected,)
    out = ops.output_size(size, kernel, stride, dilation, expected)
    if padding == "same":
        assert out == -(-size // stride)


def test_rot180_flips_space_and_swaps_channels_per_group():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 2, 6))  # 2 inputs and 3 filters per group
    rotated = to_numpy(ops.rot180(w, groups=2))
    assert rotated.shape == (3, 2, 3, 4)
    for g in range(2):
        for i in range(2):
            for o in range(3):
                np.testing.assert_array_equal(
                    rotated[:, :, o, g * 2 + i], w[::-1, ::-1, i, g * 3 + o]
                )


def test_spread_inserts_stride_minus_one_zeros():
    delta = np.arange(1, 1 + 2 * 3 * 2 * 1, dtype="float64").reshape(2, 3, 2, 1)
    spread = to_numpy(ops.spread(delta, (3, 2)))
    expected = np.zeros((2, 7, 3, 1))
    expected[:, ::3, ::2] = delta
    np.testing.assert_array_equal(spread, expected)


RULE_CASES = [
    pytest.param((2, 9, 3), (3, 3, 4), (2,), (1,), "valid", 1, id="1d-s2"),
    pytest.param(
        (1, 10, 2), (3, 2, 4), (1,), (3,), "causal", 1, id="1d-causal-d3"
    ),
    pytest.param((2, 8, 4), (2, 2, 6), (3,), (1,), "same", 2, id="1d-g2"),
    pytest.param(
        (1, 6, 7, 2),
        (2, 3, 1, 4),
        (2, 3),
        (1, 1),
        "same",
        2,
        id="2d-s23-depthwise",
    ),
    pytest.param(
        (2, 9, 3),
        (3, 1, 6),
        (1,),
        (2,),
        "causal",
        3,
        id="1d-causal-d2-depthwise",
    ),
    pytest.param(
        (2, 6, 7, 3),
        (3, 2, 1, 3),
        (1, 1),
        (1, 1),
        "same",
        3,
        id="2d-depthwise",
    ),
    pytest.param(
        (1, 5, 6, 5, 2),
        (2, 3, 2, 2, 3),
        (2, 1, 2),
        (1, 1, 1),
        "same",
        1,
        id="3d-s212",
    ),
    pytest.param(
        (2, 6, 5, 6, 2),
        (2, 2, 2, 1, 4),
        (1, 1, 1),
        (2, 1, 2),
        "valid",
        2,
        id="3d-d212-g2",
    ),
]


def _reference_pairs(shape, w_shape, strides, dilation, padding):
    """Padding pairs rebuilt from the reference's own rule: "before" from
    reference.pads, "after" whatever makes reference.output_shape fit."""
    spatial, kernel = shape[1:-1], w_shape[:-2]
    before = reference.pads(spatial, kernel, strides, dilation, padding)
    out = reference.output_shape(spatial, kernel, strides, dilation, padding)
    pairs = []
    for size, k, s, d, b, n in zip(
        spatial, kernel, strides, dilation, before, out
    ):
        needed = (n - 1) * s + (k - 1) * d + 1
        pairs.append((b, max(needed - size - b, 0)))
    return tuple(pairs)


@pytest.mark.parametrize(
    ("shape", "w_shape", "strides", "dilation", "padding", "groups"),
    RULE_CASES,
)
def test_rules_match_reference(
    shape, w_shape, strides, dilation, padding, groups
):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[-1])
    pairs = _reference_pairs(shape, w_shape, strides, dilation, padding)
    z = to_numpy(
        ops.conv(
            x,
            w,
            b,
            strides=strides,
            dilation=dilation,
            pairs=pairs,
            groups=groups,
        )
    )
    expected_z = reference.forward(x, w, b, strides, dilation, padding, groups)
    assert_close(z, expected_z, FLOAT64_RTOL, "forward z")

    delta = rng.standard_normal(z.shape)
    dx = ops.input_delta(
        delta, w, shape[1:-1], strides, pairs, dilation, groups
    )
    dw = ops.kernel_gradient(
        x, delta, w_shape[:-2], strides, pairs, dilation, groups
    )
    assert_close(
        to_numpy(dx),
        reference.input_gradient(
            delta, w, shape, strides, dilation, padding, groups
        ),
        FLOAT64_RTOL,
        "input_delta",
    )
    assert_close(
        to_numpy(dw),
        reference.kernel_gradient(
            x, delta, w_shape, strides, dilation, padding, groups
        ),
        FLOAT64_RTOL,
        "kernel_gradient",
    )
    assert_close(
        to_numpy(ops.bias_gradient(delta)),
        delta.sum(axis=tuple(range(delta.ndim - 1))),
        FLOAT64_RTOL,
        "bias_gradient",
    )


@pytest.mark.parametrize(
    ("shape", "w_shape", "strides", "dilation", "padding", "groups"),
    [RULE_CASES[1], RULE_CASES[3], RULE_CASES[4]],
)
def test_reference_matches_finite_differences(
    shape, w_shape, strides, dilation, padding, groups
):
    """The oracle itself is checked: its chain-rule sums against central
    differences of its own forward sum, with a tanh activation."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[-1])
    z = reference.forward(x, w, b, strides, dilation, padding, groups)
    upstream = rng.standard_normal(z.shape)

    def loss():
        z = reference.forward(x, w, b, strides, dilation, padding, groups)
        return float(np.sum(np.tanh(z) * upstream))

    dx, dw, db = reference.layer_backward(
        x,
        w,
        b,
        upstream,
        lambda z: 1 - np.tanh(z) ** 2,
        strides=strides,
        dilation=dilation,
        padding=padding,
        groups=groups,
    )
    for name, analytic, array in [("x", dx, x), ("w", dw, w), ("b", db, b)]:
        numeric = numeric_gradient(loss, array)
        assert_close(analytic, numeric, FD_RTOL, f"reference d/d{name}")


@pytest.mark.parametrize(
    ("dtype", "unit_roundoff"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)]
)
def test_depthwise_kernel_gradient_sums_half_types_in_float32(
    dtype, unit_roundoff
):
    """8192 products in each entry, each about 0.1, summing to about 700:
    added up in float16 (spacing 0.5 there) they would drift by percents.
    Against the reference in float64 on the same rounded inputs, the error
    is that of rounding the inputs and the result, a few units of
    roundoff."""
    import keras

    rng = np.random.default_rng(3)
    shape, w_shape = (8, 32, 32, 2), (3, 3, 1, 4)
    x = keras.ops.cast(0.3 + rng.standard_normal(shape), dtype)
    delta = keras.ops.cast(0.3 + rng.standard_normal((8, 32, 32, 4)), dtype)
    dw = ops.kernel_gradient(
        x, delta, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), groups=2
    )
    assert keras.backend.standardize_dtype(dw.dtype) == dtype
    expected = reference.kernel_gradient(
        to_numpy(keras.ops.cast(x, "float64")),
        to_numpy(keras.ops.cast(delta, "float64")),
        w_shape,
        (1, 1),
        (1, 1),
        "same",
        groups=2,
    )
    dw = to_numpy(keras.ops.cast(dw, "float64"))
    assert_close(dw, expected, 4 * unit_roundoff, f"{dtype} kernel gradient")
