"""Fuzz: every convolution the rules run, and the layers, against plain
NumPy sums in float64, in the precisions users train in.

The rules are built from one primitive, ``_backend.correlate``: forward,
input delta and kernel gradient are each correlations, with strides,
dilations, paddings, groups and channel counts (the batch, in the kernel
gradient) that a layer's own arguments never show directly. A backend bug
for one shape of correlation is a wrong gradient for every layer that
meets it: TensorFlow's and torch's oneDNN CPU kernels return uninitialised
memory for float32, one input channel, an output width of 1 at a width
stride above 1, an output height of at least 2 and a batch of at least 2,
about 1 in 50 small random configurations. The configurations here are
drawn from a fixed seed, with the edge values (one channel, one output
position, batch 1, sizes barely larger than the kernel) much more likely
than at random, and each one is compared entry by entry: a result may
differ from the exact sum only by the rounding its precision allows.

The layer-level fuzz draws random valid RotConv1D/2D/3D layers and
compares output and gradients in float32 with ``keras_rotconv.reference``
in float64: never with the built-in layer alone, which shares the
backend's bugs.
"""

import itertools
import math

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    FLOAT32_RTOL,
    LAYERS,
    assert_close,
    reference_results,
    to_numpy,
)

from keras_rotconv import _backend

SEED = 20261130
# A float32 convolution takes milliseconds on TensorFlow and torch, whose
# oneDNN kernels had the bug (it met about 1 in 130 of these cases); JAX
# runs XLA's own, which compiles each shape anew (0.04 s in float32, 0.6 s
# in a half type), and checks the first cases of the same sequence.
if BACKEND == "jax":
    CASES = {
        "float32": {1: 100, 2: 200, 3: 60},
        "half": {1: 10, 2: 14, 3: 6},
    }
else:
    CASES = {
        "float32": {1: 400, 2: 2000, 3: 600},
        "half": {1: 100, 2: 300, 3: 100},
    }

# Error bound per entry, as a multiple of Σ |x̂| |w| over that entry's
# terms: the inputs are exact in the dtype (the NumPy sum reads the rounded
# values), so what is left is the sum's rounding and the result's. A sum of
# n products accumulated in float32 is off by at most about n·2^-24 of it
# (n <= 150 here: 1e-5); a half-type result is then rounded to its own
# unit, 2^-11 (float16) or 2^-8 (bfloat16), twice that leaves room for the
# float32 accumulation under it. A garbage entry is off by far more.
# TensorFlow's CPU convolutions accumulate float16, and bfloat16 where
# oneDNN is off, in the half type itself (measured: up to 3 units off);
# for them the bound is the one for summing n terms in that type, n units
# (Higham, "Accuracy and Stability of Numerical Algorithms", 4.2).
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
BOUND = {
    "float32": 1e-5,
    "float16": 2 * UNIT["float16"],
    "bfloat16": 2 * UNIT["bfloat16"],
}


def _axis(rng, strided, dilated):
    """One spatial axis: ``(size, kernel, stride, dilation, (before,
    after))`` with at least one output position.

    The output length is drawn from the edges first: one window that ends
    at the axis's end, one window with input left over after it (fewer
    than a stride's worth), two windows, or several.
    """
    k = int(rng.choice([1, 2, 3, 4]))
    s = int(rng.choice([1, 2, 3])) if strided else 1
    d = int(rng.choice([1, 2, 3])) if dilated else 1
    pads = [(0, 0)] * 3 + [tuple(int(v) for v in rng.integers(3, size=2))]
    before, after = pads[rng.integers(len(pads))]
    span = (k - 1) * d + 1
    edge = rng.choice(["one", "one-and-rest", "two", "several"])
    length = {"one": 1, "one-and-rest": 1, "two": 2, "several": 5}[edge]
    rest = int(rng.integers(1, s)) if edge == "one-and-rest" and s > 1 else 0
    size = (length - 1) * s + span - before - after + rest
    return max(size, 1), k, s, d, (before, after)


def correlate_cases(rank, count, seed=SEED):
    """``count`` random correlations on ``rank`` spatial axes: dicts of
    ``x`` shape, ``w`` shape, strides, dilation, groups, pairs."""
    rng = np.random.default_rng([seed, rank])
    cases = []
    for _ in range(count):
        # Keras refuses strides and dilation together, so no rule's
        # correlation has both (the kernel gradient swaps them).
        motion = rng.choice(["strided", "strided", "dilated", "plain"])
        axes = [
            _axis(rng, motion == "strided", motion == "dilated")
            for _ in range(rank)
        ]
        groups = int(rng.choice([1, 1, 2, 3]))
        cin = groups * int(rng.choice([1, 1, 1, 2, 3]))
        cout = groups * int(rng.choice([1, 2, 4]))
        batch = int(rng.choice([1, 2, 3, 7]))
        cases.append(
            dict(
                x=(batch, *(a[0] for a in axes), cin),
                w=(*(a[1] for a in axes), cin // groups, cout),
                strides=tuple(a[2] for a in axes),
                dilation=tuple(a[3] for a in axes),
                groups=groups,
                pairs=tuple(a[4] for a in axes),
            )
        )
    return cases


def numpy_correlate(x, w, strides, dilation, groups, pairs):
    """``out[n, p, o] = Σ_{k, i} x̂[n, p·s + k·d, i] w[k, i, o]`` per group,
    ``x̂`` the zero-padded ``x``: one tap at a time, in float64."""
    rank = len(strides)
    x = np.pad(x, [(0, 0), *pairs, (0, 0)])
    kernel = w.shape[:rank]
    lengths = [
        (n - (k - 1) * d - 1) // s + 1
        for n, k, s, d in zip(x.shape[1:-1], kernel, strides, dilation)
    ]
    cin_g, cout = w.shape[-2:]
    out = np.zeros((x.shape[0], *lengths, cout))
    for tap in itertools.product(*map(range, kernel)):
        window = x[
            (
                slice(None),
                *(
                    slice(k * d, k * d + (length - 1) * s + 1, s)
                    for k, d, s, length in zip(tap, dilation, strides, lengths)
                ),
            )
        ]
        for g in range(groups):
            inputs = window[..., g * cin_g : (g + 1) * cin_g]
            columns = slice(g * cout // groups, (g + 1) * cout // groups)
            out[..., columns] += inputs @ w[tap][:, columns]
    return out


def _case_id(case):
    return "x{x}-w{w}-s{strides}-d{dilation}-g{groups}-p{pairs}".format(
        **case
    ).replace(" ", "")


def _rounded(rng, shape, dtype):
    values = rng.standard_normal(shape).astype("float32")
    tensor = keras.ops.convert_to_tensor(values, dtype=dtype)
    return tensor, to_numpy(keras.ops.cast(tensor, "float32")).astype("f8")


def _check_correlate(case, dtype, rng):
    x, x64 = _rounded(rng, case["x"], dtype)
    w, w64 = _rounded(rng, case["w"], dtype)
    motion = {k: case[k] for k in ("strides", "dilation", "groups", "pairs")}
    out = to_numpy(
        keras.ops.cast(_backend.correlate(x, w, **motion), "float32")
    ).astype("f8")
    exact = numpy_correlate(x64, w64, **motion)
    scale = numpy_correlate(np.abs(x64), np.abs(w64), **motion)
    assert out.shape == exact.shape, f"shape {out.shape} != {exact.shape}"
    bound = BOUND[dtype]
    if BACKEND == "tensorflow" and dtype != "float32":
        terms = math.prod(case["w"][:-1])
        bound = max(bound, terms * UNIT[dtype])
    excess = np.abs(out - exact) - bound * scale
    bad = int(np.sum(~(excess <= 1e-30)))  # NaN counts as bad
    worst = np.nanmax(np.abs(out - exact) / np.maximum(scale, 1e-30))
    return bad, worst / bound


def _half_dtypes():
    """The half types this backend's CPU convolution computes: TensorFlow
    has no float16 or bfloat16 CPU kernel for every rank (it raises), so
    each is probed once with the smallest convolution of each rank."""
    kept = []
    for dtype in ("float16", "bfloat16"):
        try:
            for rank in (1, 2, 3):
                _backend.correlate(
                    keras.ops.ones((1, *(2,) * rank, 1), dtype=dtype),
                    keras.ops.ones((*(2,) * rank, 1, 1), dtype=dtype),
                    (1,) * rank,
                    (1,) * rank,
                    1,
                    ((0, 0),) * rank,
                )
        except Exception:  # an unsupported dtype raises, whatever its type
            continue
        kept.append(dtype)
    return kept


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_correlate_matches_exact_sums(rank, dtype):
    """Every fuzzed correlation, entry by entry, within its dtype's
    rounding of the exact float64 sum; the failures listed together."""
    if dtype != "float32" and dtype not in HALF_DTYPES:
        pytest.skip(f"no {dtype} convolution on the {BACKEND} CPU backend")
    rng = np.random.default_rng([SEED, rank, len(dtype)])
    failures, worst = [], 0.0
    counts = CASES["float32" if dtype == "float32" else "half"]
    for case in correlate_cases(rank, counts[rank]):
        bad, case_worst = _check_correlate(case, dtype, rng)
        worst = max(worst, case_worst)
        if bad:
            failures.append(
                f"{_case_id(case)}: {bad} entries, {case_worst:.1f}x the bound"
            )
    assert not failures, (
        f"{len(failures)} of {counts[rank]} {dtype} correlations "
        "off by more than rounding:\n" + "\n".join(failures[:20])
    )
    assert worst <= 1


HALF_DTYPES = _half_dtypes()


# The configurations the oneDNN bug met, each once through the primitive
# and once through a layer: the forward pass (one input channel, output
# width 1, width stride > 1) and the kernel gradient (batch 1, a dilated
# one-tap kernel axis, so the gradient's correlation has one channel,
# output width 1 and stride 2).
REGRESSION_CORRELATIONS = [
    dict(
        x=(7, 14, 3, 1),
        w=(4, 3, 1, 4),
        strides=(1, 2),
        dilation=(1, 1),
        groups=1,
        pairs=((0, 0), (0, 0)),
    ),
    dict(
        x=(7, 3, 8, 1),
        w=(1, 6, 1, 5),
        strides=(1, 3),
        dilation=(1, 1),
        groups=1,
        pairs=((0, 0), (0, 0)),
    ),
    dict(
        x=(6, 11, 14, 1),
        w=(1, 3, 1, 6),
        strides=(1, 2),
        dilation=(1, 1),
        groups=1,
        pairs=((0, 0), (0, 0)),
    ),
    dict(
        x=(6, 4, 8, 2, 1),
        w=(2, 3, 2, 1, 2),
        strides=(1, 1, 3),
        dilation=(1, 1, 1),
        groups=1,
        pairs=((0, 0), (1, 1), (0, 0)),
    ),
]

REGRESSION_LAYERS = [
    (2, dict(filters=4, kernel_size=(4, 3), strides=(1, 2)), (7, 14, 3, 1)),
    (2, dict(filters=5, kernel_size=(1, 6), strides=(1, 3)), (7, 3, 8, 1)),
    (
        2,
        dict(
            filters=6,
            kernel_size=(3, 1),
            dilation_rate=(1, 2),
            padding="same",
            groups=1,
            use_bias=False,
        ),
        (1, 14, 11, 6),
    ),
    (
        2,
        dict(
            filters=6,
            kernel_size=(3, 1),
            dilation_rate=(1, 2),
            padding="same",
            groups=2,
            use_bias=False,
        ),
        (1, 14, 11, 6),
    ),
    (
        3,
        dict(
            filters=4,
            kernel_size=(2, 3, 2),
            strides=(1, 1, 3),
            padding="same",
            groups=2,
        ),
        (6, 4, 8, 2, 2),
    ),
    (1, dict(filters=3, kernel_size=3, strides=2), (5, 9, 1)),
]


@pytest.mark.parametrize("case", REGRESSION_CORRELATIONS, ids=_case_id)
def test_correlate_regression(case):
    # Repeated: the bug's output is whatever the buffer held, which can be
    # the right values by chance once.
    rng = np.random.default_rng(0)
    for _ in range(3):
        bad, worst = _check_correlate(case, "float32", rng)
        assert bad == 0, f"{bad} entries off, worst {worst:.1e} of the bound"


def _check_layer(rank, config, shape, seed):
    """A float32 layer's output and gradients against the reference's
    float64 ones, for the loss Σ y · upstream."""
    from conftest import gradients

    rot_class = LAYERS[rank][0]
    layer = rot_class(**config, dtype="float32")
    layer.build(shape)
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [rng.standard_normal(w.shape).astype("float32") for w in layer.weights]
    )
    x = rng.standard_normal(shape).astype("float32")
    upstream = rng.standard_normal(layer.compute_output_shape(shape))
    upstream = upstream.astype("float32")
    y, dx, dvars = gradients(layer, x, upstream)
    expected = reference_results(layer, x, upstream)
    actual = (y, dx, dvars[layer.kernel.name])
    if layer.use_bias:
        actual += (dvars[layer.bias.name],)
    for name, a, e in zip(("y", "dC/dx", "dC/dw", "dC/db"), actual, expected):
        assert_close(a, e, FLOAT32_RTOL, f"{name} of {config} on {shape}")


@pytest.mark.parametrize(
    ("rank", "config", "shape"),
    REGRESSION_LAYERS,
    ids=[f"{r}d-{i}" for i, (r, _, _) in enumerate(REGRESSION_LAYERS)],
)
def test_layer_regression(rank, config, shape):
    for seed in range(3):
        _check_layer(rank, config, shape, seed)


def layer_cases(rank, count, seed=SEED):
    """``count`` random valid ``(config, input shape)`` pairs for the
    rank's RotConv layer, channels-last, the edge values favoured.

    No activation: its derivative is the backend's autodiff, not the
    rules, and a float32 ``1 - tanh(z)^2`` near saturation is off by far
    more than the convolution's rounding."""
    rng = np.random.default_rng([seed, rank, 1])
    cases = []
    while len(cases) < count:
        motion = rng.choice(["strided", "dilated", "plain"])
        padding = str(rng.choice(["valid", "same"] + ["causal"] * (rank == 1)))
        axes = [
            _axis(rng, motion == "strided", motion == "dilated")
            for _ in range(rank)
        ]
        groups = int(rng.choice([1, 1, 2]))
        cin = groups * int(rng.choice([1, 1, 2, 3]))
        config = dict(
            filters=groups * int(rng.choice([1, 2, 3])),
            kernel_size=tuple(a[1] for a in axes),
            strides=tuple(a[2] for a in axes),
            dilation_rate=tuple(a[3] for a in axes),
            padding=padding,
            groups=groups,
            use_bias=bool(rng.integers(2)),
        )
        # Valid padding needs the dilated kernel to fit.
        sizes = [
            max(a[0], (a[1] - 1) * a[3] + 1 if padding == "valid" else 1)
            for a in axes
        ]
        batch = int(rng.choice([1, 1, 2, 3]))
        cases.append((config, (batch, *sizes, cin)))
    return cases


# JAX compiles each layer's gradient program anew (about 1.5 s each).
LAYER_CASES_PER_RANK = (
    {1: 8, 2: 12, 3: 6} if BACKEND == "jax" else {1: 24, 2: 32, 3: 16}
)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_random_layers_match_the_reference_in_float32(rank):
    failures = []
    cases = layer_cases(rank, LAYER_CASES_PER_RANK[rank])
    for index, (config, shape) in enumerate(cases):
        try:
            _check_layer(rank, config, shape, index)
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, (
        f"{len(failures)} of {len(cases)} layers:\n" + "\n".join(failures)
    )
