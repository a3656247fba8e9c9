"""RotConv1D/2D/3D against keras.layers.Conv1D/2D/3D holding the same
weights.

Outputs and the gradients with respect to the input, the kernel and the bias
are compared over a grid of configurations per rank, in float64 and float32,
on whichever backend runs the suite. The built-in layer's gradients come from
that backend's own autodiff (``tf.GradientTape``, ``jax.grad``, torch
autograd) through its own convolution gradient, which the RotConv layers
never use.
"""

import itertools
import random
import warnings

import numpy as np
import pytest
from conftest import (
    LAYERS,
    RTOL,
    all_pairs,
    assert_close,
    gradients,
    reference_results,
    relative_error,
    share_random_weights,
)

# (groups, input channels, filters); "depthwise" is groups == channels.
GROUPINGS = {"g1": (1, 3, 4), "g2": (2, 4, 6), "depthwise": (3, 3, 6)}
SIZES = ["odd", "even", "barely"]
# Smooth and piecewise-linear activations whose float64 results stay
# float64 on every backend (on JAX, Keras computes tanh of float64 in
# float32; see test_backends.py).
ACTIVATIONS = [None, "relu", "sigmoid"]
DATA_FORMATS = ["channels_last", "channels_first"]
BATCHES = [1, 3]

# The values each rank's grid covers. A motion is (strides, dilation_rate):
# Keras rejects strides > 1 together with dilation > 1.
VALUES = {
    1: dict(
        kernels=[1, 2, 3, 5],
        motions=[(1, 1), (2, 1), (3, 1), (1, 2)],
        paddings=["valid", "same", "causal"],
    ),
    2: dict(
        kernels=[1, 2, 3, 5, (3, 2)],
        motions=[(1, 1), (2, 1), (3, 1), ((2, 1), 1), (1, 2), (1, (2, 1))],
        paddings=["valid", "same"],
    ),
    3: dict(
        kernels=[1, 2, 3, (3, 1, 2)],
        motions=[(1, 1), (2, 1), ((1, 2, 3), 1), (1, 2), (1, (2, 1, 1))],
        paddings=["valid", "same"],
    ),
}
# Smallest spatial sizes of odd and even inputs per rank; each axis grows to
# the dilated kernel when that is larger.
SMALLEST = {
    1: {"odd": (9,), "even": (8,)},
    2: {"odd": (7, 9), "even": (8, 6)},
    3: {"odd": (5, 7, 5), "even": (6, 4, 6)},
}


def _tuple(value, rank):
    return value if isinstance(value, tuple) else (value,) * rank


def _spatial(rank, size, kernel, dilation):
    """Input sizes of the given kind, never smaller than the dilated
    kernel."""
    extent = [
        (k - 1) * d + 1
        for k, d in zip(_tuple(kernel, rank), _tuple(dilation, rank))
    ]
    if size == "barely":
        # One position more than the kernel spans on the first axis, and not
        # a position more on the others.
        return (extent[0] + 1, *extent[1:])
    parity = 1 if size == "odd" else 0
    return tuple(
        n + (n % 2 != parity) for n in map(max, SMALLEST[rank][size], extent)
    )


def _designs(rank):
    """The grid of one rank. 2D, the reference grid: every kernel x motion x
    padding x grouping, with data format, batch size, input size and
    activation drawn with a fixed seed so that each value of each meets many
    of the others. 1D and 3D: every pair of values of kernel, motion,
    padding, grouping and data format (a pairwise covering design: the
    suite runs once per backend, and a compiled JAX gradient costs about a
    second per configuration), the rest drawn."""
    values = VALUES[rank]
    if rank != 2:
        rows = all_pairs(
            dict(
                kernel=values["kernels"],
                motion=values["motions"],
                padding=values["paddings"],
                grouping=list(GROUPINGS),
                data_format=DATA_FORMATS,
            )
        )
    else:
        rows = [
            dict(kernel=k, motion=m, padding=p, grouping=g)
            for k, m, p, g in itertools.product(
                values["kernels"],
                values["motions"],
                values["paddings"],
                GROUPINGS,
            )
        ]
    for index, row in enumerate(rows):
        draw = random.Random(index)
        row.setdefault("data_format", draw.choice(DATA_FORMATS))
        row["batch"] = draw.choice(BATCHES)
        row["size"] = draw.choice(SIZES)
        row["activation"] = draw.choice(ACTIVATIONS)
    return rows


def _case(rank, row):
    groups, channels, filters = GROUPINGS[row["grouping"]]
    strides, dilation = row["motion"]
    config = dict(
        filters=filters,
        kernel_size=row["kernel"],
        strides=strides,
        padding=row["padding"],
        dilation_rate=dilation,
        groups=groups,
        activation=row["activation"],
        data_format=row["data_format"],
    )
    spatial = _spatial(rank, row["size"], row["kernel"], dilation)
    if row["data_format"] == "channels_last":
        shape = (row["batch"], *spatial, channels)
    else:
        shape = (row["batch"], channels, *spatial)
    name = (
        f"{rank}d-k{row['kernel']}-s{strides}-d{dilation}-{row['padding']}-"
        f"{row['grouping']}-{row['data_format'][9:]}-n{row['batch']}-"
        f"{row['size']}-{row['activation']}"
    ).replace(" ", "")
    return pytest.param(rank, config, shape, id=name)


DESIGNS = {rank: _designs(rank) for rank in LAYERS}
GRID = [_case(rank, row) for rank in LAYERS for row in DESIGNS[rank]]


def _to_last(x):
    return np.moveaxis(x, 1, -1)


def _to_first(x):
    return np.moveaxis(x, -1, 1)


def twin_gradients(twin, x, upstream, data_format):
    """The built-in layer's results in ``data_format``. TensorFlow's CPU
    kernels cannot run channels-first convolutions, so the twin is always
    channels-last and channels-first tensors are transposed around it: the
    same convolution, computed by an independent path."""
    if data_format == "channels_last":
        return gradients(twin, x, upstream)
    y, dx, dvars = gradients(twin, _to_last(x), _to_last(upstream))
    return _to_first(y), _to_first(dx), dvars


def _built_twins(rank, config, shape):
    """The RotConv layer in ``config``'s data format and its built-in twin,
    always channels-last (see ``twin_gradients``), with the same random
    weights."""
    rot_class, keras_class = LAYERS[rank]
    rot = rot_class(**config)
    rot.build(shape)
    twin = keras_class(**dict(config, data_format="channels_last"))
    if config["data_format"] == "channels_first":
        twin.build((shape[0], *shape[2:], shape[1]))
    else:
        twin.build(shape)
    share_random_weights([rot, twin])
    return rot, twin


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("rank", "config", "shape"), GRID)
def test_matches_builtin(rank, config, shape, dtype):
    # The weights are replaced below; a zeros initializer skips Keras's
    # random one, which compiles a JAX program per kernel shape (seconds per
    # layer on CPU).
    config = dict(config, dtype=dtype, kernel_initializer="zeros")
    rot, twin = _built_twins(rank, config, shape)

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
    kernel_oracle = dvars_ref["kernel"]
    if relative_error(dvars["kernel"], kernel_oracle) > rtol:
        # torch 2.13's own convolution weight gradient on CPU is sometimes
        # wrong in float32 (1x1 kernels with stride 2, and only after some
        # other convolutions ran: relative error ~0.7 against an exact
        # einsum). Where the built-in layer disagrees, the float64 NumPy
        # transcription of the derivation decides, and the disagreement is
        # reported as a warning.
        kernel_oracle = reference_results(rot, x, upstream)[2]
        warnings.warn(
            f"built-in {type(twin).__name__} kernel gradient off by "
            f"{relative_error(dvars_ref['kernel'], kernel_oracle):.1e} "
            "relative to the NumPy reference; RotConv compared with the "
            "reference instead",
            stacklevel=1,
        )
    assert_close(dvars["kernel"], kernel_oracle, rtol, "dC/dkernel")
    assert_close(dvars["bias"], dvars_ref["bias"], rtol, "dC/dbias")


@pytest.mark.parametrize("rank", sorted(LAYERS))
def test_grid_covers_every_listed_value(rank):
    """Every listed value appears in the rank's grid, and in 1D and 3D every
    pair of the covered factors appears together (a guard against an unlucky
    seed or a broken design after edits)."""
    rows = DESIGNS[rank]
    values = VALUES[rank]
    listed = dict(
        kernel=values["kernels"],
        motion=values["motions"],
        padding=values["paddings"],
        grouping=list(GROUPINGS),
        data_format=DATA_FORMATS,
        batch=BATCHES,
        size=SIZES,
        activation=ACTIVATIONS,
    )
    for factor, options in listed.items():
        for option in options:
            assert any(row[factor] == option for row in rows), (factor, option)
    if rank != 2:
        paired = ["kernel", "motion", "padding", "grouping", "data_format"]
        for a, b in itertools.combinations(paired, 2):
            for u, v in itertools.product(listed[a], listed[b]):
                assert any(row[a] == u and row[b] == v for row in rows), (
                    f"{a}={u} never meets {b}={v}"
                )
    else:
        assert len(rows) == (
            len(values["kernels"])
            * len(values["motions"])
            * len(values["paddings"])
            * len(GROUPINGS)
        )


# Cases of every rank, activation, padding and data format for the check
# below.
FALLBACK_CASES = [
    case
    for case in GRID
    if case.id.startswith(("1d-k3-s1-d1-causal", "2d-k3-s2", "3d-k2"))
]


@pytest.mark.parametrize(("rank", "config", "shape"), FALLBACK_CASES)
def test_reference_fallback_matches_builtin(rank, config, shape):
    """The fallback oracle of test_matches_builtin, the NumPy reference's
    kernel gradient behind the activation, agrees with the built-in layer
    where that one is right (float64)."""
    config = dict(config, dtype="float64", kernel_initializer="zeros")
    rot, twin = _built_twins(rank, config, shape)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    upstream = rng.standard_normal(rot.compute_output_shape(shape))
    _, _, dvars = twin_gradients(twin, x, upstream, config["data_format"])
    fallback = reference_results(rot, x, upstream)[2]
    assert_close(fallback, dvars["kernel"], RTOL["float64"], "dC/dkernel")
