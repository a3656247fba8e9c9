"""RotConv2D under random and hostile input: property-based gradient checks,
error parity with Conv2D over random argument sets, non-finite values, empty
batches and tampered saved files.

The property-based tests draw a bounded number of examples (``EXAMPLES``)
so that each runs in a few seconds; hypothesis shrinks any failure to a
minimal configuration and prints it.
"""

import json
import zipfile

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    FLOAT32_RTOL,
    FLOAT64_RTOL,
    assert_close,
    gradients,
    make_twins,
    penalty_gradients,
    reference_results,
    share_random_weights,
    to_numpy,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_rotconv import RotConv2D, reference

# JAX and torch compile or dispatch afresh for every new shape: an example
# costs them ~10 times what it costs TensorFlow.
EXAMPLES = {
    "gradients": 40 if BACKEND == "tensorflow" else 5,
    "arguments": 150,
}
# Building layers and tracing their first call is slow and uneven, so a
# per-example deadline would only measure the machine.
SETTINGS = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _effective(kernel, dilation):
    return (kernel - 1) * dilation + 1


@st.composite
def valid_configurations(draw):
    """A Conv2D configuration Keras accepts and an input shape it fits."""
    groups = draw(st.sampled_from([1, 2, 3]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(2))
    if draw(st.booleans()):
        strides = tuple(draw(st.integers(1, 3)) for _ in range(2))
        dilation = (1, 1)
    else:
        strides = (1, 1)
        dilation = tuple(draw(st.integers(1, 3)) for _ in range(2))
    padding = draw(st.sampled_from(["valid", "same"]))
    spatial = []
    for k, d in zip(kernel, dilation):
        least = _effective(k, d) if padding == "valid" else 1
        spatial.append(least + draw(st.integers(0, 4)))
    channels = groups * draw(st.integers(1, 2))
    data_format = draw(st.sampled_from(["channels_last", "channels_first"]))
    batch = draw(st.integers(1, 2))
    shape = (
        (batch, *spatial, channels)
        if data_format == "channels_last"
        else (batch, channels, *spatial)
    )
    config = dict(
        filters=groups * draw(st.integers(1, 2)),
        kernel_size=kernel,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        groups=groups,
        data_format=data_format,
        use_bias=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "tanh"])),
        dtype="float64",
    )
    return config, shape, draw(st.integers(0, 2**32 - 1))


def _to_last(x):
    return np.moveaxis(x, 1, -1)


def _to_first(x):
    return np.moveaxis(x, -1, 1)


def channels_last_twin(rot, config, shape):
    """The built-in layer with ``rot``'s weights, always channels-last:
    TensorFlow's CPU kernels cannot run Conv2D channels-first, so
    channels-first tensors are transposed around it (``_to_last``)."""
    twin = keras.layers.Conv2D(**dict(config, data_format="channels_last"))
    if config["data_format"] == "channels_first":
        shape = (shape[0], *shape[2:], shape[1])
    twin.build(shape)
    twin.set_weights(rot.get_weights())
    return twin


class SlicedConv2D(keras.layers.Layer):
    """The oracle for random configurations: Conv2D's convolution by its
    definition, each group of channels its own built-in ``keras.ops.conv``,
    channels-last inside, differentiated by the backend's own autodiff.

    (The built-in layer itself runs grouped convolutions through XLA on
    TensorFlow's CPU, compiled afresh for every new layer: seconds each.)
    """

    def __init__(self, config):
        super().__init__(dtype=config["dtype"])
        self.config = config

    def build(self, input_shape):
        c = self.config
        channels = input_shape[
            1 if c["data_format"] == "channels_first" else -1
        ]
        self.kernel = self.add_weight(
            shape=(*c["kernel_size"], channels // c["groups"], c["filters"]),
            name="kernel",
        )
        if c["use_bias"]:
            self.bias = self.add_weight(shape=(c["filters"],), name="bias")

    def call(self, x):
        c = self.config
        first = c["data_format"] == "channels_first"
        if first:
            x = keras.ops.transpose(x, (0, 2, 3, 1))
        width, outputs = self.kernel.shape[2], c["filters"] // c["groups"]
        y = keras.ops.concatenate(
            [
                keras.ops.conv(
                    x[..., g * width : (g + 1) * width],
                    self.kernel[..., g * outputs : (g + 1) * outputs],
                    strides=c["strides"],
                    padding=c["padding"],
                    dilation_rate=c["dilation_rate"],
                )
                for g in range(c["groups"])
            ],
            axis=-1,
        )
        if c["use_bias"]:
            y = y + self.bias
        y = keras.activations.get(c["activation"])(y)
        return keras.ops.transpose(y, (0, 3, 1, 2)) if first else y


@settings(max_examples=EXAMPLES["gradients"], **SETTINGS)
@given(valid_configurations())
def test_random_configurations_match_the_sliced_oracle(case):
    """Outputs, first-order gradients and the gradient of a gradient
    penalty, against ``SlicedConv2D`` holding the same weights."""
    config, shape, seed = case
    rot = RotConv2D(**config)
    rot.build(shape)
    share_random_weights([rot], seed)
    oracle = SlicedConv2D(config)
    oracle.build(shape)
    oracle.set_weights(rot.get_weights())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    upstream = rng.standard_normal(rot.compute_output_shape(shape))

    y, dx, dvars = gradients(rot, x, upstream)
    try:
        y_ref, dx_ref, dvars_ref = gradients(oracle, x, upstream)
    except RuntimeError as error:
        # torch 2.13's own convolution backward fails on some tiny shapes
        # ("slow_conv2d: grad_weight must be contiguous"; keras.layers.Conv2D
        # fails the same way, e.g. a (1, 2) kernel on a 1x2 input with one
        # filter). There the NumPy reference is the oracle.
        if BACKEND != "torch" or "contiguous" not in str(error):
            raise
        _assert_matches_reference(rot, x, upstream, y, dx, dvars)
        return
    assert_close(y, y_ref, FLOAT64_RTOL, f"output of {config}")
    assert_close(dx, dx_ref, FLOAT64_RTOL, f"dC/dx of {config}")
    assert sorted(dvars) == sorted(dvars_ref)
    for name in dvars:
        assert_close(
            dvars[name], dvars_ref[name], FLOAT64_RTOL, f"{name} of {config}"
        )
    # Without a nonlinear activation the penalty does not depend on the
    # bias, and both report no gradient for it.
    penalty = penalty_gradients(rot, x, upstream)
    penalty_ref = penalty_gradients(oracle, x, upstream)
    for name in penalty_ref:
        if penalty_ref[name].dtype == object:
            assert penalty[name].dtype == object, f"penalty d/d{name}"
            continue
        assert_close(
            penalty[name],
            penalty_ref[name],
            FLOAT64_RTOL,
            f"penalty d/d{name} of {config}",
        )


def _assert_matches_reference(layer, x, upstream, y, dx, dvars):
    """The layer's output and gradients against keras_rotconv.reference in
    float64."""
    y_ref, dx_ref, dkernel, dbias = reference_results(layer, x, upstream)
    assert_close(y, y_ref, FLOAT64_RTOL, "output against the reference")
    assert_close(dx, dx_ref, FLOAT64_RTOL, "dC/dx against the reference")
    assert_close(
        dvars["kernel"], dkernel, FLOAT64_RTOL, "dC/dkernel against reference"
    )
    if layer.use_bias:
        assert_close(
            dvars["bias"], dbias, FLOAT64_RTOL, "dC/dbias against reference"
        )


# Values Keras accepts next to values it rejects, for every argument that
# shapes the convolution: wrong types, zero, negative, wrong length, unknown
# names and letter case.
ARGUMENT_POOLS = {
    "filters": [-1, 0, 1, 2, 3, 4, 6, 2.5, "4", None, [2, 2]],
    "kernel_size": [
        -1, 0, 1, 2, 3, 5, (2, 3), (3, 0), (1, 2, 3), (2,), [2, 2], "3", 1.5
    ],
    "strides": [-1, 0, 1, 2, 3, (1, 2), (2, 0), (1, 2, 3), "2", 1.5],
    "padding": ["valid", "same", "VALID", "Same", "causal", "full", "", 1],
    "data_format": ["channels_last", "channels_first", "NHWC", 0],
    "dilation_rate": [-1, 0, 1, 2, (1, 2), (2, 0), (1, 2, 3), "2"],
    "groups": [-1, 0, 1, 2, 3, 4, 1.5],
    "activation": ["relu", "linear", "no_such_activation", 3],
    "use_bias": [True, False],
}  # fmt: skip


@st.composite
def argument_sets(draw):
    """Some of the arguments, each from its pool, and an input of any rank
    from 3 to 5 with sizes from 0 up (channels from 1 up)."""
    names = draw(st.lists(st.sampled_from(sorted(ARGUMENT_POOLS)), unique=True))
    kwargs = {
        name: draw(st.sampled_from(ARGUMENT_POOLS[name])) for name in names
    }
    if "filters" not in kwargs:
        kwargs["filters"] = 2
    if "kernel_size" not in kwargs:
        kwargs["kernel_size"] = 2
    if draw(st.integers(0, 9)) == 0:
        kwargs["no_such_argument"] = 1
    rank = draw(st.sampled_from([3, 4, 4, 4, 5]))
    shape = [draw(st.integers(0, 6)) for _ in range(rank)]
    # Never zero channels: the built-in layer fails there by each backend's
    # accident (TensorFlow's kernel rejects it, Keras's JAX and torch code
    # divides by zero), not by checking its arguments.
    channels = 1 if kwargs.get("data_format") == "channels_first" else -1
    shape[channels] = max(shape[channels], 1)
    return kwargs, tuple(shape)


def _build_and_call(cls, kwargs, x):
    try:
        return cls(**kwargs)(x), None
    except Exception as error:
        return None, error


def _by_keras_rules(kwargs, x):
    """Conv2D's outcome on ``x`` by Keras's own shape rule: ``(output, None)``
    or ``(None, the error)``. The oracle where TensorFlow's oneDNN
    convolution (on by default on CPUs with AVX512_VNNI) returns its input
    for an empty result: Conv2D then gives an empty batch the input's shape
    (or fails adding the bias), and an input smaller than the kernel an
    "output" instead of Keras's ValueError."""
    try:
        layer = keras.layers.Conv2D(**kwargs)
        return np.zeros(layer.compute_output_shape(x.shape)), None
    except Exception as error:
        return None, error


@settings(max_examples=EXAMPLES["arguments"], **SETTINGS)
@given(argument_sets())
def test_random_arguments_raise_exactly_when_conv2d_raises(case):
    """Both layers get the same arguments and input; the built-in one runs
    channels-last on a transposed input when asked for channels-first,
    which TensorFlow's CPU kernels cannot run (an error of the backend, not
    of the arguments, that RotConv2D does not share)."""
    kwargs, shape = case
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    twin_kwargs, twin_x = kwargs, x
    if kwargs.get("data_format") == "channels_first":
        twin_kwargs = dict(kwargs, data_format="channels_last")
        twin_x = _to_last(x)
    expected, expected_error = _build_and_call(
        keras.layers.Conv2D, twin_kwargs, twin_x
    )
    if BACKEND == "tensorflow":
        by_rule, rule_error = _by_keras_rules(twin_kwargs, twin_x)
        wrong_shape = expected is not None and by_rule is not None
        wrong_shape = wrong_shape and expected.shape != by_rule.shape
        if twin_x.size == 0 or wrong_shape or expected_error is None:
            expected, expected_error = by_rule, rule_error
    actual, error = _build_and_call(RotConv2D, kwargs, x)
    assert type(error) is type(expected_error), (
        f"RotConv2D({kwargs}) on {shape}: raised {error!r}; Conv2D raised "
        f"{expected_error!r}"
    )
    if expected_error is None:
        expected = to_numpy(expected)
        if twin_x is not x:
            expected = _to_first(expected)
        assert to_numpy(actual).shape == expected.shape


def _nonfinite_kind(a):
    """0 finite, 1 NaN, 2 +inf, 3 -inf, entry by entry."""
    a = np.asarray(a, dtype=np.float64)
    return np.select(
        [np.isnan(a), np.isposinf(a), np.isneginf(a)], [1, 2, 3], default=0
    )


NONFINITE_CASES = {
    "valid": dict(filters=4, kernel_size=3),
    "stride2-same": dict(filters=4, kernel_size=3, strides=2, padding="same"),
    "dilation2-same": dict(
        filters=4, kernel_size=2, dilation_rate=2, padding="same"
    ),
    "groups2-stride12": dict(
        filters=4, kernel_size=3, groups=2, strides=(1, 2)
    ),
    "stride31-same": dict(
        filters=4, kernel_size=(2, 3), strides=(3, 1), padding="same"
    ),
}
# C = Σ y · u makes the delta finite (u); C = Σ y² · u / 2 makes it y · u,
# so the non-finite outputs travel back through both backward rules.
LOSSES = {
    "linear": lambda y, u: (y * u, u),
    "square": lambda y, u: (y * y * u / 2, y * u),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize(
    "dtype", ["float32", "float64"] if BACKEND == "tensorflow" else ["float64"]
)
@pytest.mark.parametrize("name", sorted(NONFINITE_CASES))
def test_nan_and_inf_reach_the_same_positions(name, dtype, loss):
    """Which entries come out NaN, +inf or -inf, against the built-in layer
    (outputs) and against the derivation's sums in ``reference`` (outputs and
    gradients): a sum is NaN when one of its terms is NaN or it holds both
    infinities, whatever order it is added in, so the pattern is exact.

    The built-in layer is not the gradients' oracle here: TensorFlow's
    filter-gradient kernel multiplies padding zeros by the input (0 · inf is
    NaN) and rounds its float32 grouped sums differently, and gives NaN
    where the sum the derivation writes has no such term.
    """
    shape = (2, 9, 8, 4)
    config = dict(NONFINITE_CASES[name], dtype=dtype)
    rot, twin = make_twins(RotConv2D, keras.layers.Conv2D, config, shape)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    x[0, 1, 2, 0] = np.nan
    x[1, 4, 4, 1] = np.inf
    x[1, 7, 0, 3] = -np.inf
    x[0, 8, 7, 2] = np.inf  # a corner: reached only through padding
    x = x.astype(dtype)
    kernel, bias = (w.astype(np.float64) for w in rot.get_weights())
    args = (rot.strides, rot.dilation_rate, rot.padding, rot.groups)

    with np.errstate(invalid="ignore", over="ignore"):
        y_ref = reference.forward(x.astype(np.float64), kernel, bias, *args)
        upstream = rng.standard_normal(y_ref.shape)
        _, delta = LOSSES[loss](y_ref, upstream)
        expected = {
            "y": y_ref,
            "dC/dx": reference.input_gradient(delta, kernel, shape, *args),
            "dC/dkernel": reference.kernel_gradient(
                x.astype(np.float64), delta, kernel.shape, *args
            ),
            "dC/dbias": reference.bias_gradient(delta),
        }
    actual = _nonfinite_gradients(rot, x, upstream.astype(dtype), loss)
    twin_y = to_numpy(twin(x))

    assert _nonfinite_kind(y_ref).any(), "the input reached no output"
    assert np.array_equal(_nonfinite_kind(actual["y"]), _nonfinite_kind(twin_y))
    for what, value in expected.items():
        assert np.array_equal(
            _nonfinite_kind(actual[what]), _nonfinite_kind(value)
        ), f"{what}: non-finite entries differ from the derivation's sums"


def _nonfinite_gradients(layer, x, upstream, loss):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            cost = tf.reduce_sum(LOSSES[loss](y, upstream)[0])
        grads = tape.gradient(cost, [x, *layer.trainable_variables])
    else:
        # The backends' own gradients follow from C's delta: feed it as the
        # upstream of C = Σ y · delta, which has the same gradients.
        y = layer(x)
        delta = LOSSES[loss](to_numpy(y), upstream)[1]
        _, dx, dvars = gradients(layer, x, delta)
        grads = [dx, dvars["kernel"], dvars["bias"]]
    names = ["y", "dC/dx", "dC/dkernel", "dC/dbias"]
    return dict(zip(names, map(to_numpy, [y, *grads]), strict=True))


@pytest.mark.parametrize(
    "config",
    [
        dict(filters=3, kernel_size=3),
        dict(filters=4, kernel_size=3, strides=2, padding="same", groups=2),
        dict(filters=4, kernel_size=2, dilation_rate=2),
        dict(filters=4, kernel_size=3, data_format="channels_first"),
    ],
    ids=["plain", "stride2-groups2", "dilation2", "channels-first"],
)
def test_empty_batch_forward_and_gradients(config):
    """Nothing to sum over: every gradient is zero, the kernel gradient
    included, whose convolution has the batch as its channel axis."""
    channels_first = config.get("data_format") == "channels_first"
    shape = (0, 4, 7, 7) if channels_first else (0, 7, 7, 4)
    config = dict(config, dtype="float64")
    config.setdefault("data_format", "channels_last")
    rot = RotConv2D(**config)
    rot.build(shape)
    share_random_weights([rot])
    twin = channels_last_twin(rot, config, shape)
    x = np.zeros(shape)
    upstream = np.zeros(rot.compute_output_shape(shape))

    y, dx, dvars = gradients(rot, x, upstream)
    if channels_first:
        y_ref, dx_ref, dvars_ref = gradients(
            twin, _to_last(x), _to_last(upstream)
        )
        y_ref, dx_ref = _to_first(y_ref), _to_first(dx_ref)
    else:
        y_ref, dx_ref, dvars_ref = gradients(twin, x, upstream)
    assert y.shape == y_ref.shape and dx.shape == dx_ref.shape
    for name in dvars_ref:
        assert dvars[name].shape == dvars_ref[name].shape, name
        assert not np.any(dvars[name]), f"{name} of an empty batch"
    penalty = penalty_gradients(rot, x, upstream)
    assert all(not np.any(g) for g in penalty.values())


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.function and XLA are TensorFlow's"
)
@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_empty_batch_known_only_when_the_graph_runs(jit_compile):
    """tf.distribute gives a replica an empty share of a last, partial batch
    inside a graph traced for any batch size. The same function must serve
    both, to second order; under XLA, a branch on the batch size would
    crash the compiler on the empty side."""
    import tensorflow as tf

    config = dict(filters=4, kernel_size=3, strides=2, padding="same")
    rot, twin = make_twins(
        RotConv2D, keras.layers.Conv2D, config, (None, 7, 7, 2)
    )

    def trace(layer, jit_compile):
        @tf.function(
            input_signature=[tf.TensorSpec([None, 7, 7, 2])],
            jit_compile=jit_compile,
        )
        def step(x):
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    loss = tf.reduce_sum(tf.sin(layer(x)))
                dx, *dvars = inner.gradient(
                    loss, [x, *layer.trainable_variables]
                )
                penalty = tf.reduce_sum(dx**2)
            return [*dvars, *outer.gradient(penalty, layer.trainable_variables)]

        return step

    # The built-in layer runs as a plain graph: it is the oracle at batch 3,
    # and compiling it too would only double the time XLA takes. At batch 0
    # the oracle is the rule itself: every gradient is a sum of no terms.
    # (Conv2D fails there where TensorFlow's oneDNN kernels are on, as on
    # CPUs with AVX512_VNNI: its convolution returns its input for an empty
    # batch, and then "Missing 1-th output from Conv2DBackpropFilter".)
    rot_step, twin_step = trace(rot, jit_compile), trace(twin, False)
    x = tf.random.stateless_normal((3, 7, 7, 2), seed=(3, 0))
    for mine, theirs in zip(rot_step(x), twin_step(x), strict=True):
        assert_close(
            to_numpy(mine),
            to_numpy(theirs),
            FLOAT32_RTOL,
            "gradient at batch 3",
        )
    empty = rot_step(tf.zeros((0, 7, 7, 2)))
    shapes = [tuple(v.shape) for v in rot.trainable_variables] * 2
    assert [tuple(g.shape) for g in empty] == shapes
    assert not any(np.any(to_numpy(g)) for g in empty), "gradient of no terms"


def _tampered_copy(source, target, edit):
    """A copy of the .keras file ``source`` whose conv layer's saved
    configuration went through ``edit``."""
    with zipfile.ZipFile(source) as original:
        with zipfile.ZipFile(target, "w") as copy:
            for item in original.infolist():
                data = original.read(item.filename)
                if item.filename == "config.json":
                    config = json.loads(data)
                    for layer in config["config"]["layers"]:
                        if layer["config"]["name"] == "conv":
                            edit(layer["config"])
                    data = json.dumps(config).encode()
                copy.writestr(item, data)


# Each edit, and what the error must say: the argument and the value.
TAMPERINGS = {
    "unknown-argument": (
        lambda c: c.update(no_such_argument=3),
        ["no_such_argument", "3"],
    ),
    "kernel-size-string": (
        lambda c: c.update(kernel_size="three"),
        ["kernel_size", "three"],
    ),
    "strides-string": (lambda c: c.update(strides="two"), ["strides", "two"]),
    "padding-unknown": (
        lambda c: c.update(padding="full"),
        ["padding", "full"],
    ),
    "filters-negative": (lambda c: c.update(filters=-4), ["filters", "-4"]),
    "groups-not-dividing": (lambda c: c.update(groups=3), ["groups=3"]),
    "activation-unknown": (
        lambda c: c.update(activation="no_such_activation"),
        ["no_such_activation"],
    ),
    "dtype-unknown": (lambda c: c.update(dtype="float7"), ["float7"]),
    "filters-list": (lambda c: c.update(filters=[4, 4]), ["filters", "[4, 4]"]),
}


LOADER_MARK = "Exception encountered:"


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampered_keras_file_fails_clearly(tmp_path, name):
    edit, says = TAMPERINGS[name]
    errors = {}
    for conv in (RotConv2D, keras.layers.Conv2D):
        model = keras.Sequential(
            [
                keras.Input((8, 8, 2)),
                conv(4, 3, name="conv"),
                keras.layers.Flatten(),
                keras.layers.Dense(2),
            ]
        )
        path = tmp_path / f"{conv.__name__}.keras"
        model.save(path)
        _tampered_copy(path, tmp_path / "tampered.keras", edit)
        with pytest.raises(Exception) as raised:
            keras.saving.load_model(tmp_path / "tampered.keras", safe_mode=True)
        errors[conv] = raised.value
    assert type(errors[RotConv2D]) is type(errors[keras.layers.Conv2D])
    # Keras's loader quotes the whole saved configuration, tampered value
    # included, and then the error the layer raised: only that last part
    # shows whether the layer's error is clear.
    message = str(errors[RotConv2D])
    assert LOADER_MARK in message, message[-500:]
    cause = message.rsplit(LOADER_MARK, 1)[1]
    for word in says:
        assert word in cause, f"{word!r} missing from: {cause}"
