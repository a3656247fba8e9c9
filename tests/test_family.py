"""The transposed, depthwise and separable twins against the built-in Keras
layers holding the same weights, on whichever backend runs the suite.

Outputs and every gradient (input, each weight) are compared over pairwise
covering designs per class (every value of each factor meets every value of
each other factor at least once) in float64 and float32; a few cases per
class against float64 finite differences and, to second order, the
gradient of a gradient penalty. The built-in layer's gradients come from the
backend's own autodiff through the framework's convolution gradients, which
the twins never use.

Where a built-in transposed convolution refuses a configuration (on
TensorFlow: any dilation on CPU, and ``"same"`` padding with an
``output_padding`` whose output TensorFlow's own ``SAME`` rule cannot map
back onto the input), the twin is compared with a NumPy scatter of the
transposed convolution instead, which agrees with the JAX and torch
built-ins.
"""

import itertools
import json
import os
import random

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    FD_RTOL,
    FLOAT64_RTOL,
    RTOL,
    TF_CONV_GRADIENTS,
    all_pairs,
    assert_close,
    gradients,
    jax_equations,
    numeric_gradient,
    penalty_gradients,
    relative_error,
    share_random_weights,
    tf_gradient_graph_ops,
    to_numpy,
)

import keras_rotconv as kr
from keras_rotconv import reference

# name: (twin, built-in, rank)
CLASSES = {
    "RotConv1DTranspose": (kr.RotConv1DTranspose, keras.layers.Conv1DTranspose),
    "RotConv2DTranspose": (kr.RotConv2DTranspose, keras.layers.Conv2DTranspose),
    "RotConv3DTranspose": (kr.RotConv3DTranspose, keras.layers.Conv3DTranspose),
    "RotDepthwiseConv1D": (kr.RotDepthwiseConv1D, keras.layers.DepthwiseConv1D),
    "RotDepthwiseConv2D": (kr.RotDepthwiseConv2D, keras.layers.DepthwiseConv2D),
    "RotSeparableConv1D": (kr.RotSeparableConv1D, keras.layers.SeparableConv1D),
    "RotSeparableConv2D": (kr.RotSeparableConv2D, keras.layers.SeparableConv2D),
}

DATA_FORMATS = ["channels_last", "channels_first"]
# A factor of the designs like any other: each dtype meets every value of
# every other factor, at half the cost of running every row in both.
DTYPES = ["float64", "float32"]
ACTIVATIONS = [None, "relu", "sigmoid"]
# (strides, dilation_rate): Keras rejects both above 1 for the transposes.
MOTIONS = {
    1: [(1, 1), (2, 1), (3, 1), (1, 2)],
    2: [(1, 1), (2, 1), (3, 1), ((2, 1), 1), (1, 2), (1, (1, 2))],
    3: [(1, 1), (2, 1), ((1, 2, 3), 1), (1, 2)],
}
KERNELS = {1: [1, 2, 3, 5], 2: [1, 2, 3, (3, 2)], 3: [1, 2, (3, 1, 2)]}
# Transposed inputs are the small side of an upsampling.
TRANSPOSE_SIZES = {1: (5,), 2: (4, 3), 3: (3, 2, 3)}


def _tuple(value, rank):
    return tuple(value) if isinstance(value, tuple) else (value,) * rank


def _finish_rows(rows):
    for index, row in enumerate(rows):
        draw = random.Random(index)
        row["batch"] = draw.choice([1, 2])
        row["activation"] = draw.choice(ACTIVATIONS)
    return rows


def _output_paddings(strides, choice):
    if choice == "none":
        return None
    if choice == "zero":
        return 0
    return tuple(s - 1 for s in strides)


def transpose_cases(name, rank):
    rows = _finish_rows(
        all_pairs(
            dict(
                kernel=KERNELS[rank],
                motion=MOTIONS[rank],
                padding=["valid", "same"],
                output_padding=["none", "zero", "top"],
                data_format=DATA_FORMATS,
                dtype=DTYPES,
            )
        )
    )
    cases = []
    for row in rows:
        strides, dilation = row["motion"]
        config = dict(
            filters=3,
            kernel_size=row["kernel"],
            strides=strides,
            padding=row["padding"],
            output_padding=_output_paddings(
                _tuple(strides, rank), row["output_padding"]
            ),
            dilation_rate=dilation,
            activation=row["activation"],
            data_format=row["data_format"],
            dtype=row["dtype"],
        )
        spatial = TRANSPOSE_SIZES[rank]
        cases.append((name, config, _shape(row, spatial, 2)))
    return cases


def _shape(row, spatial, channels):
    if row["data_format"] == "channels_last":
        return (row["batch"], *spatial, channels)
    return (row["batch"], channels, *spatial)


def depthwise_cases(name, rank, separable):
    factors = dict(
        kernel=KERNELS[rank],
        motion=MOTIONS[rank],
        padding=["valid", "same"],
        multiplier=[1, 2, 3],
        channels=[1, 3],
        data_format=DATA_FORMATS,
        dtype=DTYPES,
    )
    cases = []
    for row in _finish_rows(all_pairs(factors)):
        strides, dilation = row["motion"]
        config = dict(
            kernel_size=row["kernel"],
            strides=strides,
            padding=row["padding"],
            depth_multiplier=row["multiplier"],
            dilation_rate=dilation,
            activation=row["activation"],
            data_format=row["data_format"],
            dtype=row["dtype"],
        )
        if separable:
            config["filters"] = 1 + 3 * (row["channels"] == 3)
        extents = [
            (k - 1) * d + 1
            for k, d in zip(_tuple(row["kernel"], rank), _tuple(dilation, rank))
        ]
        spatial = tuple(max(e + 2, 5 + a) for a, e in enumerate(extents))
        cases.append((name, config, _shape(row, spatial, row["channels"])))
    return cases


def _all_cases():
    cases = []
    for rank in (1, 2, 3):
        cases += transpose_cases(f"RotConv{rank}DTranspose", rank)
    for rank in (1, 2):
        cases += depthwise_cases(f"RotDepthwiseConv{rank}D", rank, False)
        cases += depthwise_cases(f"RotSeparableConv{rank}D", rank, True)
    return cases


def _case_id(name, config, shape):
    short = {
        "kernel_size": "k",
        "strides": "s",
        "dilation_rate": "d",
        "output_padding": "op",
        "depth_multiplier": "m",
        "filters": "f",
    }
    parts = [name]
    for key, value in config.items():
        if key in short:
            parts.append(f"{short[key]}{value}")
        elif key in ("padding", "activation"):
            parts.append(str(value))
    parts.append(config["data_format"][9:])
    parts.append(config["dtype"][5:])
    parts.append("x".join(map(str, shape)))
    return "-".join(parts).replace(" ", "")


CASES = _all_cases()
GRID = [pytest.param(*case, id=_case_id(*case)) for case in CASES]

# The largest relative error per class, dtype and quantity, written to the
# file FAMILY_ERRORS names (for the report) when set.
LARGEST = {}


@pytest.fixture(scope="module", autouse=True)
def _report_largest_errors():
    yield
    path = os.environ.get("FAMILY_ERRORS")
    if path:
        counts = {}
        for name, *_ in CASES:
            counts[name] = counts.get(name, 0) + 1
        with open(path, "w") as f:
            json.dump({"cases": counts, "largest": LARGEST}, f, indent=1)


def _check(name, dtype, what, actual, expected):
    key = f"{name} {dtype}"
    LARGEST[key] = max(LARGEST.get(key, 0.0), relative_error(actual, expected))
    assert_close(actual, expected, RTOL[dtype], f"{name} {what}")


# ---------------------------------------------------------------------------
# Oracles


def builtin_refuses(name, config, shape):
    """Whether the built-in layer cannot run ``config`` on this backend:
    TensorFlow's depthwise convolution (under the depthwise and separable
    layers) takes equal strides only; its transposed convolution takes no
    dilation on CPU, and with
    ``"same"`` padding and an ``output_padding`` it needs the output that
    Keras computes to give back the input's length under TensorFlow's own
    ``SAME`` rule, ``ceil(O / s) = L``."""
    if BACKEND != "tensorflow":
        return False
    rank = len(shape) - 2
    if "Transpose" not in name:
        # TensorFlow's depthwise kernel takes equal strides only.
        return len(set(_tuple(config["strides"], rank))) > 1
    if any(d > 1 for d in _tuple(config["dilation_rate"], rank)):
        return True
    if config["padding"] != "same" or config["output_padding"] is None:
        return False
    first = config["data_format"] == "channels_first"
    lengths = shape[2:] if first else shape[1:-1]
    for length, k, s, p in zip(
        lengths,
        _tuple(config["kernel_size"], rank),
        _tuple(config["strides"], rank),
        _tuple(config["output_padding"], rank),
    ):
        out = (length - 1) * s + k % 2 + p
        if -(-out // s) != length:
            return True
    return False


def _activation_name(layer):
    name = layer.activation.__name__ if layer.activation else None
    return None if name == "linear" else name


_ACT = {
    None: (lambda z: z, np.ones_like),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
    "sigmoid": (
        lambda z: 1 / (1 + np.exp(-z)),
        lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2,
    ),
}


def numpy_transpose(layer, x, upstream):
    """``(y, dC/dx, {name: dC/dweight})`` of a transposed layer, in float64
    NumPy, channels-last: the textbook scatter, input position ``p`` adding
    ``x[p] · w[k]`` at output position ``p·s + k·d``, over the
    ``(L - 1)·s + span`` positions the scatter reaches; Keras's output is
    the ``O`` positions (its documented length) left after cropping the
    excess evenly, the odd position at the end, with zeros past the
    scatter's end (output padding)."""
    kernel, bias = (np.asarray(w, "float64") for w in layer.get_weights())
    rank = layer.rank
    n, *lengths, _ = x.shape
    out = list(layer.compute_output_shape(x.shape)[1:-1])
    s, d, ks = layer.strides, layer.dilation_rate, layer.kernel_size
    reach = [
        (ln - 1) * st + (k - 1) * di + 1
        for ln, st, k, di in zip(lengths, s, ks, d)
    ]
    before = [max((r - o) // 2, 0) for r, o in zip(reach, out)]
    size = [max(r, b + o) for r, b, o in zip(reach, before, out)]
    full = np.zeros((n, *size, kernel.shape[-2]))
    windows = {}
    for tap in itertools.product(*map(range, ks)):
        index = tuple(
            slice(t * di, t * di + (ln - 1) * st + 1, st)
            for t, di, ln, st in zip(tap, d, lengths, s)
        )
        windows[tap] = (slice(None), *index)
        full[windows[tap]] += np.einsum("...c,fc->...f", x, kernel[tap])
    crop = (slice(None), *(slice(b, b + o) for b, o in zip(before, out)))
    z = full[crop] + bias
    act, slope = _ACT[_activation_name(layer)]
    delta_full = np.zeros_like(full)
    delta_full[crop] = upstream * slope(z)
    dx = np.zeros_like(x)
    dkernel = np.zeros_like(kernel)
    for tap, window in windows.items():
        dx += np.einsum("...f,fc->...c", delta_full[window], kernel[tap])
        axes = list(range(rank + 1))
        dkernel[tap] = np.tensordot(delta_full[window], x, (axes, axes))
    grads = {
        "kernel": dkernel,
        "bias": delta_full[crop].sum(axis=tuple(range(rank + 1))),
    }
    return act(z), dx, grads


def numpy_depthwise(layer, x, upstream):
    """``(y, dC/dx, {name: dC/dweight})`` of a depthwise or separable
    layer, channels-last, by ``keras_rotconv.reference`` (the derivation in
    plain loops): the depthwise kernel as a grouped one, one group per
    channel, then for a separable layer the pointwise convolution."""
    weights = [np.asarray(w, "float64") for w in layer.get_weights()]
    depthwise, rest = weights[0], weights[1:]
    channels = depthwise.shape[-2]
    one = (1,) * layer.rank
    grouped = depthwise.reshape((*depthwise.shape[:-2], 1, -1))
    motion = dict(
        strides=layer.strides,
        dilation=layer.dilation_rate,
        padding=layer.padding,
    )
    separable = hasattr(layer, "pointwise_kernel")
    bias = rest[-1] if layer.use_bias else 0.0
    z = reference.forward(
        x, grouped, 0.0 if separable else bias, **motion, groups=channels
    )
    if separable:
        depth_out = z
        z = reference.forward(depth_out, rest[0], bias, one, one, "valid")
    act, slope = _ACT[_activation_name(layer)]
    delta = upstream * slope(z)
    grads = {"bias": reference.bias_gradient(delta)}
    if separable:
        point = rest[0]
        grads["pointwise_kernel"] = reference.kernel_gradient(
            depth_out, delta, point.shape, one, one, "valid"
        )
        delta = reference.input_gradient(
            delta, point, depth_out.shape, one, one, "valid"
        )
    name = "depthwise_kernel" if separable else "kernel"
    grads[name] = reference.kernel_gradient(
        x, delta, grouped.shape, **motion, groups=channels
    ).reshape(depthwise.shape)
    dx = reference.input_gradient(
        delta, grouped, x.shape, **motion, groups=channels
    )
    if not layer.use_bias:
        grads.pop("bias")
    return act(z), dx, grads


def _to_last(x):
    return np.moveaxis(x, 1, -1)


def _to_first(x):
    return np.moveaxis(x, -1, 1)


def _last_shape(config, shape):
    if config["data_format"] == "channels_first":
        return (shape[0], *shape[2:], shape[1])
    return shape


def make_twins(name, config, shape):
    """The twin in ``config``'s data format and the built-in layer, always
    channels-last (TensorFlow's CPU kernels run no channels-first
    convolution), with the same random weights."""
    rot_class, keras_class = CLASSES[name]
    rot = rot_class(**config)
    twin = keras_class(**dict(config, data_format="channels_last"))
    rot.build(shape)
    twin.build(_last_shape(config, shape))
    share_random_weights([rot, twin])
    return rot, twin


def expected_results(name, twin, x, upstream, data_format, config):
    """The oracle's ``(y, dC/dx, {name: grad})`` in ``data_format``."""
    first = data_format == "channels_first"
    if first:
        x, upstream = _to_last(x), _to_last(upstream)
    if builtin_refuses(name, config, x.shape):
        oracle = numpy_transpose if "Transpose" in name else numpy_depthwise
        y, dx, grads = oracle(twin, x, upstream)
    else:
        y, dx, grads = gradients(twin, x, upstream)
    if first:
        y, dx = _to_first(y), _to_first(dx)
    return y, dx, grads


def _inputs(rot, shape, dtype, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    upstream = rng.standard_normal(rot.compute_output_shape(shape))
    return x, upstream.astype(dtype)


# ---------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize(("name", "config", "shape"), GRID)
def test_matches_builtin(name, config, shape):
    dtype = config["dtype"]
    rot, twin = make_twins(name, config, shape)
    x, upstream = _inputs(rot, shape, dtype)
    y, dx, grads = gradients(rot, x, upstream)
    y_ref, dx_ref, grads_ref = expected_results(
        name, twin, x, upstream, config["data_format"], config
    )
    assert y.dtype == dtype and dx.dtype == dtype
    _check(name, dtype, "output", y, y_ref)
    _check(name, dtype, "dC/dx", dx, dx_ref)
    assert sorted(grads) == sorted(grads_ref)
    for weight, grad in grads.items():
        _check(name, dtype, f"dC/d{weight}", grad, grads_ref[weight])


def test_designs_cover_every_pair():
    """Each class's design meets every pair of its factors' values (a
    guard against a broken design after edits): checked on the configs
    themselves, for kernel, motion and padding."""
    for name in CLASSES:
        configs = [c for n, c, _ in CASES if n == name]
        rank = 3 if "3D" in name else 2 if "2D" in name else 1
        for k, (s, d), p in itertools.product(
            KERNELS[rank], MOTIONS[rank], ["valid", "same"]
        ):
            assert any(c["kernel_size"] == k for c in configs), (name, k)
            assert any(
                c["strides"] == s
                and c["dilation_rate"] == d
                and c["padding"] == p
                for c in configs
            ), (name, s, d, p)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="needs dilation on CPU")
@pytest.mark.parametrize(
    ("name", "config", "shape"),
    [case for case in GRID if "Transpose" in case.id][::3],
)
def test_numpy_scatter_matches_builtin(name, config, shape):
    """The fallback oracle (NumPy scatter) agrees with the built-in
    transposed convolution where that one runs (JAX, torch), float64."""
    shape = _last_shape(config, shape)
    config = dict(config, dtype="float64", data_format="channels_last")
    _, twin = make_twins(name, config, shape)
    x, upstream = _inputs(twin, shape, "float64", seed=3)
    y, dx, grads = gradients(twin, x, upstream)
    y_np, dx_np, grads_np = numpy_transpose(twin, x, upstream)
    assert_close(y_np, y, FLOAT64_RTOL, "output")
    assert_close(dx_np, dx, FLOAT64_RTOL, "dC/dx")
    for weight in grads:
        assert_close(grads_np[weight], grads[weight], FLOAT64_RTOL, weight)


# ---------------------------------------------------------------------------
# Finite differences, second order, errors, saving

# One small case per class, smooth (sigmoid) so that finite differences and
# second derivatives are well defined; no dilation on the transposes, which
# TensorFlow's CPU kernels refuse.
SMALL = {
    "RotConv1DTranspose": (
        dict(filters=2, kernel_size=3, strides=2, padding="same"),
        (1, 3, 2),
    ),
    "RotConv2DTranspose": (
        dict(
            filters=2, kernel_size=(3, 2), strides=(2, 1), output_padding=(1, 0)
        ),
        (1, 3, 2, 2),
    ),
    "RotConv3DTranspose": (
        dict(filters=2, kernel_size=2, strides=2, padding="same"),
        (1, 2, 2, 1, 2),
    ),
    "RotDepthwiseConv1D": (
        dict(kernel_size=3, depth_multiplier=2, strides=2, padding="same"),
        (1, 6, 2),
    ),
    "RotDepthwiseConv2D": (
        dict(kernel_size=2, depth_multiplier=2, dilation_rate=2),
        (1, 4, 4, 2),
    ),
    "RotSeparableConv1D": (
        dict(filters=2, kernel_size=3, depth_multiplier=2, padding="same"),
        (1, 5, 2),
    ),
    "RotSeparableConv2D": (
        dict(filters=2, kernel_size=2, strides=2, padding="same"),
        (1, 4, 3, 2),
    ),
}


def _small_twins(name):
    config, shape = SMALL[name]
    config = dict(config, activation="sigmoid", dtype="float64")
    rot, twin = make_twins(
        name, dict(config, data_format="channels_last"), shape
    )
    return rot, twin, shape


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_match_finite_differences(name):
    rot, _, shape = _small_twins(name)
    x, upstream = _inputs(rot, shape, "float64", seed=4)
    _, dx, grads = gradients(rot, x, upstream)
    weights = rot.get_weights()

    def loss():
        rot.set_weights(weights)
        return float(np.sum(to_numpy(rot(x)) * upstream))

    assert_close(dx, numeric_gradient(loss, x), FD_RTOL, "dC/dx")
    for variable, array in zip(rot.trainable_variables, weights):
        fd = numeric_gradient(loss, array)
        assert_close(grads[variable.name], fd, FD_RTOL, variable.name)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradient_penalty_matches_builtin(name):
    """Second order: the gradient of ``Σ (dC/dx)^2`` with respect to every
    weight, through the derived backward pass, against the built-in
    layer's."""
    rot, twin, shape = _small_twins(name)
    x, upstream = _inputs(rot, shape, "float64", seed=5)
    mine = penalty_gradients(rot, x, upstream)
    theirs = penalty_gradients(twin, x, upstream)
    for weight in theirs:
        assert_close(mine[weight], theirs[weight], FLOAT64_RTOL, weight)


_BAD_ARGUMENTS = {
    "transpose": [
        dict(filters=0, kernel_size=2),
        dict(filters=[2], kernel_size=2),
        dict(filters=2, kernel_size=0),
        dict(filters=2, kernel_size=2, strides=0),
        dict(filters=2, kernel_size=2, strides=2, output_padding=2),
        dict(filters=2, kernel_size=2, strides=2, dilation_rate=2),
        dict(filters=2, kernel_size=2, padding="causal"),
        dict(filters=2, kernel_size=2, data_format="channels_middle"),
    ],
    "depthwise": [
        dict(kernel_size=2, depth_multiplier=0),
        dict(kernel_size=0),
        dict(kernel_size=2, strides=0),
        dict(kernel_size=2, padding="full"),
        dict(kernel_size=(2, 2, 2)),
    ],
    "separable": [
        dict(filters=0, kernel_size=2),
        dict(filters=2, kernel_size=2, depth_multiplier=0),
        dict(filters=2, kernel_size=0),
        dict(filters=2, kernel_size=2, strides=0),
        dict(filters=2, kernel_size=2, padding="full"),
    ],
}


def _kind(name):
    if "Transpose" in name:
        return "transpose"
    return "depthwise" if "Depthwise" in name else "separable"


def _error_type(layer_class, kwargs):
    try:
        layer_class(**kwargs)
    except Exception as error:
        return type(error)
    return None


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_bad_arguments_raise_the_builtin_error_type(name):
    rot_class, keras_class = CLASSES[name]
    for kwargs in _BAD_ARGUMENTS[_kind(name)]:
        expected = _error_type(keras_class, kwargs)
        assert expected is not None, f"Keras accepts {kwargs}"
        actual = _error_type(rot_class, kwargs)
        assert actual is expected, (kwargs, actual, expected)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_config_weights_and_keras_file_round_trip(name, tmp_path):
    """The same configuration and weight names as the built-in layer, and a
    ``.keras`` file that loads without custom objects, as the same class
    with the same outputs."""
    rot, twin, shape = _small_twins(name)
    rot_config, twin_config = rot.get_config(), twin.get_config()
    rot_config.pop("name"), twin_config.pop("name")
    assert rot_config == twin_config
    assert [w.path.split("/")[-1] for w in rot.weights] == [
        w.path.split("/")[-1] for w in twin.weights
    ]
    inputs = keras.Input(shape[1:], dtype="float64")
    model = keras.Model(inputs, rot(inputs))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[-1]) is type(rot)
    x = np.random.default_rng(6).standard_normal(shape)
    assert_close(
        to_numpy(loaded(x)), to_numpy(model(x)), FLOAT64_RTOL, "outputs"
    )


# ---------------------------------------------------------------------------
# Gradient programs: none of the framework's convolution gradients


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_tensorflow_graph_holds_no_convolution_gradient(name):
    rot, twin, shape = _small_twins(name)
    found = tf_gradient_graph_ops(rot, shape, "float64") & TF_CONV_GRADIENTS
    assert not found, sorted(found)
    # The check sees them: the built-in layer's graph has some.
    assert tf_gradient_graph_ops(twin, shape, "float64") & TF_CONV_GRADIENTS


def _jax_programs(layer, x):
    import jax
    import jax.numpy as jnp

    weights = [v.value for v in layer.trainable_variables]

    def loss(weights, x):
        y, _ = layer.stateless_call(weights, [], x)
        return jnp.sum(jnp.sin(y))

    def penalty(weights, x):
        return jnp.sum(jax.grad(loss, argnums=1)(weights, x) ** 2)

    return [
        jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(weights, x),
        jax.make_jaxpr(jax.grad(penalty))(weights, x),
    ]


def _jax_transposed(eqns):
    """JAX's convolution gradients (and its transposed convolution) are
    convolutions of an input dilated by the strides."""
    return [
        e
        for e in eqns
        if e.primitive.name == "conv_general_dilated"
        and any(d != 1 for d in e.params["lhs_dilation"])
    ]


@pytest.mark.skipif(BACKEND != "jax", reason="JAX programs")
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_jax_gradient_programs_are_the_custom_vjp(name):
    rot, twin, shape = _small_twins(name)
    x = np.random.default_rng(0).standard_normal(shape)
    for program in _jax_programs(rot, x):
        eqns = jax_equations(program)
        assert any(e.primitive.name == "custom_vjp_call" for e in eqns)
        assert not _jax_transposed(eqns), _jax_transposed(eqns)
    if any(s > 1 for s in twin.strides):
        assert _jax_transposed(jax_equations(_jax_programs(twin, x)[0]))


def _torch_nodes(tensor):
    stack, seen, names = [tensor.grad_fn], set(), set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.skipif(BACKEND != "torch", reason="torch autograd graphs")
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_torch_autograd_graph_is_the_derived_function(name):
    import torch

    rot, twin, shape = _small_twins(name)
    x = torch.tensor(
        np.random.default_rng(0).standard_normal(shape), requires_grad=True
    )
    builtin = {"ConvolutionBackward0", "ConvolutionBackwardBackward0"}
    loss = torch.sin(rot(x)).sum()
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    for tensor in (loss, dx):
        nodes = _torch_nodes(tensor)
        assert "_TorchDerivedGradientBackward" in nodes, sorted(nodes)
        assert not nodes & builtin, sorted(nodes & builtin)
    assert _torch_nodes(torch.sin(twin(x)).sum()) & builtin
