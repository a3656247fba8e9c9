"""RotConv1D/2D/3D behave as keras.layers.Conv1D/2D/3D do: arguments,
errors, shapes, configuration, saving (across backends too), LoRA,
regularizers."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    FLOAT32_RTOL,
    FLOAT64_RTOL,
    LAYERS,
    assert_close,
    gradients,
    make_twins,
    share_random_weights,
    to_numpy,
)

import keras_rotconv
from keras_rotconv import RotConv1D, RotConv2D, RotConv3D


def _zeros(*shape):
    return np.zeros(shape, dtype="float32")


def _call_twice(layer, first, second):
    layer(first)
    layer(second)


def bad_input(rank):
    """Every way to misuse a conv layer of ``rank`` spatial axes that Keras
    rejects, as functions of the layer class."""

    def image(*leading, rest=5, channels=1, batch=1):
        """A zero input whose first spatial sizes are ``leading`` and the
        others ``rest``."""
        spatial = (*leading, *(rest,) * (rank - len(leading)))
        return _zeros(batch, *spatial, channels)

    cases = {
        "input-rank-low": lambda cls: cls(2, 3)(_zeros(2, *(5,) * rank)),
        "input-rank-high": lambda cls: cls(2, 3)(_zeros(2, *(5,) * rank, 5, 1)),
        "channels-differ-from-built-kernel": lambda cls: _call_twice(
            cls(2, 3), image(channels=3), image(channels=4)
        ),
        "filters-not-divisible-by-groups": lambda cls: cls(3, 3, groups=2),
        "channels-not-divisible-by-groups": lambda cls: cls(4, 3, groups=2)(
            image(channels=3)
        ),
        "strides-with-dilation": lambda cls: cls(
            2, 3, strides=2, dilation_rate=2
        ),
        "unknown-padding": lambda cls: cls(2, 3, padding="full"),
        # Keras 3 accepts a tuple at construction and rejects it when called.
        "explicit-padding-tuple": lambda cls: cls(
            2, 3, padding=((1, 2), (0, 1), (1, 0))[:rank]
        )(image()),
        "unknown-data-format": lambda cls: cls(2, 3, data_format="nhwc"),
        "kernel-larger-than-valid-input": lambda cls: cls(2, 5)(
            image(4, rest=6)
        ),
        "dilated-kernel-larger-than-input": lambda cls: cls(
            2, 3, dilation_rate=3
        )(image(6, rest=9)),
        "kernel-larger-than-symbolic-input": lambda cls: cls(2, 5)(
            keras.Input((4, *(6,) * (rank - 1), 1))
        ),
        "kernel-larger-channels-first": lambda cls: cls(
            2, 5, data_format="channels_first"
        )(_zeros(1, 1, 4, *(6,) * (rank - 1))),
        "kernel-larger-than-later-input": lambda cls: _call_twice(
            cls(2, 3), image(), image(2)
        ),
        "filters-zero": lambda cls: cls(0, 3),
        "filters-negative": lambda cls: cls(-1, 3),
        "kernel-size-zero": lambda cls: cls(2, 0),
        "kernel-size-negative": lambda cls: cls(2, (*(3,) * (rank - 1), -1)),
        "kernel-size-too-many-axes": lambda cls: cls(2, (3,) * (rank + 1)),
        "strides-zero": lambda cls: cls(2, 3, strides=0),
        "dilation-zero": lambda cls: cls(2, 3, dilation_rate=0),
        "groups-zero": lambda cls: cls(2, 3, groups=0),
        "filters-string": lambda cls: cls("2", 3),
        "unknown-activation": lambda cls: cls(2, 3, activation="nope"),
    }
    if rank > 1:
        # Conv1D alone has causal padding.
        cases["causal-padding"] = lambda cls: cls(2, 3, padding="causal")
        cases["kernel-size-too-few-axes"] = lambda cls: cls(
            2, (3,) * (rank - 1)
        )
    return cases


BAD_INPUT = {rank: bad_input(rank) for rank in LAYERS}
BAD_CASES = [
    pytest.param(rank, case, id=f"{rank}d-{case}")
    for rank in LAYERS
    for case in sorted(BAD_INPUT[rank])
]


def _raised(make, cls):
    try:
        make(cls)
    except Exception as error:
        return error
    return None


# Where Keras's built-in layer lets the backend's own error through, the
# RotConv layer raises what the built-in layer raises on the other backends:
# (backend, case) -> (the built-in's error, the RotConv layer's error).
LEAKED_ERRORS = {
    # torch.nn.functional.conv*d refuses the input ("Kernel size can't be
    # greater than actual input size") before Keras checks it.
    ("torch", "kernel-larger-than-later-input"): (RuntimeError, ValueError),
}

# Where the built-in layer's behaviour depends on the CPU, the error Keras
# raises elsewhere is the oracle: with TensorFlow's oneDNN kernels on (by
# default on CPUs with AVX512_VNNI or AVX512_BF16), a convolution whose
# output would be empty returns its input, so Conv2D(2, 3) on a 2x2 image
# gives a (1, 2, 2, 1) "output" instead of Keras's ValueError.
CPU_DEPENDENT = {
    ("tensorflow", "kernel-larger-than-later-input"): ValueError,
}


@pytest.mark.parametrize(("rank", "case"), BAD_CASES)
def test_bad_input_raises_as_builtin_does(rank, case):
    rot_class, keras_class = LAYERS[rank]
    expected = _raised(BAD_INPUT[rank][case], keras_class)
    raised = _raised(BAD_INPUT[rank][case], rot_class)
    if expected is None and (BACKEND, case) in CPU_DEPENDENT:
        expected = CPU_DEPENDENT[BACKEND, case]("raised where oneDNN is off")
    assert expected is not None, f"{keras_class.__name__} accepts {case}"
    if (BACKEND, case) in LEAKED_ERRORS:
        leaked, raises = LEAKED_ERRORS[BACKEND, case]
        assert type(expected) is leaked, f"update LEAKED_ERRORS: {expected!r}"
        assert type(raised) is raises, f"{case}: {raised!r}"
        return
    assert type(raised) is type(expected), (
        f"{case}: {rot_class.__name__} raised {raised!r}, "
        f"{keras_class.__name__} raised {expected!r}"
    )


def _error_names(rank):
    many = lambda value: str((value,) * rank)  # noqa: E731
    small = (1, 4, *(6,) * (rank - 1), 1)
    later = (1, 2, *(5,) * (rank - 1), 1)
    cases = [
        ("strides-with-dilation", [f"strides={many(2)}", f"={many(2)}"]),
        ("filters-not-divisible-by-groups", ["groups=2", "filters=3"]),
        ("filters-zero", ["filters=0"]),
        ("kernel-larger-than-valid-input", [str(small), "5, " * rank]),
        ("kernel-larger-than-later-input", [str(later), "kernel_size"]),
    ]
    if rank > 1:
        cases.append(("causal-padding", ["causal"]))
    return [
        pytest.param(rank, case, names, id=f"{rank}d-{case}")
        for case, names in cases
    ]


@pytest.mark.parametrize(
    ("rank", "case", "names"),
    [param for rank in LAYERS for param in _error_names(rank)],
)
def test_error_names_the_argument_and_value(rank, case, names):
    message = str(_raised(BAD_INPUT[rank][case], LAYERS[rank][0]))
    for name in names:
        assert name in message, f"{name!r} missing from: {message}"


@pytest.mark.parametrize("rank", sorted(LAYERS))
@pytest.mark.parametrize("empty", ["batch", "first-axis"])
def test_empty_input_gives_empty_output_like_builtin(rank, empty):
    if empty == "batch":
        shape = (0, *(6,) * rank, 2)
    else:
        shape = (2, 0, *(6,) * (rank - 1), 2)
    config = dict(filters=3, kernel_size=3, padding="same", dtype="float64")
    rot, twin = make_twins(*LAYERS[rank], config, shape)
    x = np.zeros(shape)
    expected = tuple(rot.compute_output_shape(shape))
    y, dx, dvars = gradients(rot, x, np.zeros(expected))
    assert y.shape == expected
    assert dx.shape == shape
    assert not np.any(dvars["kernel"]) and not np.any(dvars["bias"])
    if BACKEND == "torch" and empty == "first-axis":
        # Keras's torch backend pads "same" by the kernel's extent only and
        # then calls torch's convolution, which refuses an input shorter
        # than the kernel; Keras's shape rule, not the built-in layer, is
        # the oracle here.
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            twin(x)
    else:
        assert to_numpy(twin(x)).shape == expected


SHAPE_CASES = {
    1: [
        (dict(filters=4, kernel_size=3), (2, 9, 3)),
        (
            dict(filters=4, kernel_size=3, strides=2, padding="causal"),
            (1, 9, 3),
        ),
        (
            dict(
                filters=6,
                kernel_size=2,
                groups=3,
                dilation_rate=2,
                data_format="channels_first",
            ),
            (1, 3, 9),
        ),
    ],
    2: [
        (dict(filters=4, kernel_size=3), (2, 9, 8, 3)),
        (
            dict(filters=4, kernel_size=(3, 2), strides=(2, 3), padding="same"),
            (1, 9, 8, 3),
        ),
        (
            dict(
                filters=6,
                kernel_size=2,
                groups=3,
                dilation_rate=2,
                data_format="channels_first",
            ),
            (1, 3, 9, 8),
        ),
    ],
    3: [
        (dict(filters=4, kernel_size=3), (2, 5, 6, 7, 3)),
        (
            dict(
                filters=4,
                kernel_size=(3, 2, 1),
                strides=(2, 3, 1),
                padding="same",
            ),
            (1, 7, 8, 5, 3),
        ),
        (
            dict(
                filters=6,
                kernel_size=2,
                groups=3,
                dilation_rate=(1, 2, 1),
                data_format="channels_first",
            ),
            (1, 3, 5, 6, 4),
        ),
    ],
}


@pytest.mark.parametrize(
    ("rank", "config", "shape"),
    [(rank, *case) for rank in LAYERS for case in SHAPE_CASES[rank]],
)
def test_output_shapes_match_builtin(rank, config, shape):
    rot_class, keras_class = LAYERS[rank]
    rot = rot_class(**config)
    twin = keras_class(**config)
    assert rot.compute_output_shape(shape) == twin.compute_output_shape(shape)
    symbolic = keras.Input(batch_shape=(None, *shape[1:]))
    assert rot(symbolic).shape == twin(symbolic).shape
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    assert tuple(to_numpy(rot(x)).shape) == tuple(
        rot.compute_output_shape(shape)
    )


def full_config(rank):
    """Every constructor argument set away from its default."""
    return dict(
        filters=6,
        kernel_size=(3, 2, 1)[:rank],
        strides=(2, 1, 3)[:rank],
        padding="same",
        data_format="channels_first",
        dilation_rate=1,
        groups=3,
        activation="relu",
        use_bias=False,
        kernel_initializer="he_normal",
        bias_initializer="ones",
        kernel_regularizer=keras.regularizers.L2(1e-3),
        bias_regularizer=keras.regularizers.L1(1e-3),
        activity_regularizer=keras.regularizers.L2(1e-4),
        kernel_constraint=keras.constraints.MaxNorm(2.0),
        bias_constraint=keras.constraints.NonNeg(),
        lora_rank=2,
        lora_alpha=4,
    )


RANKS = pytest.mark.parametrize("rank", sorted(LAYERS))


@RANKS
def test_config_equals_builtin_config(rank):
    rot_class, keras_class = LAYERS[rank]
    rot_config = rot_class(**full_config(rank), name="x").get_config()
    twin_config = keras_class(**full_config(rank), name="x").get_config()
    assert rot_config == twin_config


def test_causal_config_equals_conv1d_config():
    config = dict(full_config(1), padding="causal", strides=1)
    rot_config = RotConv1D(**config, name="x").get_config()
    assert rot_config == keras.layers.Conv1D(**config, name="x").get_config()


@RANKS
def test_default_config_equals_builtin_defaults(rank):
    rot_class, keras_class = LAYERS[rank]
    rot_config = rot_class(4, 3, name="x").get_config()
    assert rot_config == keras_class(4, 3, name="x").get_config()


@RANKS
def test_from_config_round_trip(rank):
    rot_class, _ = LAYERS[rank]
    layer = rot_class(**full_config(rank))
    clone = rot_class.from_config(layer.get_config())
    assert isinstance(clone, rot_class)
    assert clone.get_config() == layer.get_config()


@RANKS
def test_registered_for_saving(rank):
    rot_class, _ = LAYERS[rank]
    name = f"keras_rotconv>RotConv{rank}D"
    assert keras.saving.get_registered_name(rot_class) == name
    assert keras.saving.get_registered_object(name) is rot_class


def _branch(rank, conv, inputs):
    """Three layers of one rank: plain, strided "same" grouped, and dilated
    channels-first (causal for 1D)."""
    first = "causal" if rank == 1 else "valid"
    x = conv(4, 3, padding=first, activation="relu", name=f"c{rank}1")(inputs)
    x = conv(6, 3, strides=2, padding="same", groups=2, name=f"c{rank}2")(x)
    x = conv(
        6,
        (1, 1, 2)[-rank:],
        dilation_rate=(1, 1, 2)[-rank:],
        data_format="channels_first",
        activation="tanh",
        name=f"c{rank}3",
    )(x)
    return keras.layers.Flatten()(x)


INPUT_SHAPES = {1: (12, 2), 2: (9, 8, 2), 3: (7, 6, 5, 2)}


def _all_ranks_model(dtype="float32"):
    """RotConv1D, RotConv2D and RotConv3D in one functional model."""
    inputs = [keras.Input(INPUT_SHAPES[rank], dtype=dtype) for rank in LAYERS]
    branches = [
        _branch(rank, LAYERS[rank][0], x)
        for rank, x in zip(LAYERS, inputs, strict=True)
    ]
    merged = keras.layers.Concatenate()(branches)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(merged))


def _model_inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((batch, *INPUT_SHAPES[rank])).astype("float32")
        for rank in LAYERS
    ]


def test_keras_file_round_trip(tmp_path):
    model = _all_ranks_model()
    x = _model_inputs(5)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [
        type(layer) for layer in model.layers
    ]
    assert {RotConv1D, RotConv2D, RotConv3D} <= {
        type(layer) for layer in loaded.layers
    }
    for saved, restored in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(to_numpy(saved), to_numpy(restored)), saved.path
    assert np.array_equal(to_numpy(model(x)), to_numpy(loaded(x)))


LOAD_SCRIPT = """
import sys
import keras, numpy, keras_rotconv
model = keras.saving.load_model(sys.argv[1])
x = [numpy.load(path) for path in sys.argv[3:]]
weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
numpy.savez(sys.argv[2], *weights, y=keras.ops.convert_to_numpy(model(x)))
"""


@pytest.mark.parametrize("target", ["tensorflow", "jax", "torch"])
def test_keras_file_loads_in_a_fresh_process_on_every_backend(tmp_path, target):
    """A new process, with KERAS_BACKEND set to ``target``, loads the file
    with no custom_objects (importing keras_rotconv registers the layers).
    Weights come back bit for bit; predictions are bitwise equal on the
    saving backend and, across backends, equal to float32 rounding (each
    backend has its own convolution kernels and summation order)."""
    pytest.importorskip(target, reason=f"{target} is not installed")
    path = tmp_path / "model.keras"
    model = _all_ranks_model()
    model.save(path)
    x = _model_inputs(2)
    x_paths = []
    for i, array in enumerate(x):
        x_paths.append(str(tmp_path / f"x{i}.npy"))
        np.save(x_paths[-1], array)
    out = tmp_path / "out.npz"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(path), str(out), *x_paths],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KERAS_BACKEND": target},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = np.load(out)
    for i, saved in enumerate(model.weights):
        assert np.array_equal(loaded[f"arr_{i}"], to_numpy(saved)), saved.path
    expected = to_numpy(model(x))
    if target == BACKEND:
        assert np.array_equal(loaded["y"], expected)
    else:
        assert_close(
            loaded["y"], expected, FLOAT32_RTOL, f"prediction on {target}"
        )


@RANKS
def test_regularizer_losses_match_builtin(rank):
    config = dict(
        filters=3,
        kernel_size=3,
        kernel_regularizer=keras.regularizers.L2(0.1),
        bias_regularizer=keras.regularizers.L1(0.2),
        activity_regularizer=keras.regularizers.L2(0.3),
    )
    shape = (2, *(6,) * rank, 2)
    rot, twin = make_twins(*LAYERS[rank], config, shape)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    rot(x)
    twin(x)
    assert len(rot.losses) == len(twin.losses) == 3
    for mine, theirs in zip(rot.losses, twin.losses, strict=True):
        assert_close(
            to_numpy(mine),
            to_numpy(theirs),
            FLOAT32_RTOL,
            "regularization loss",
        )


@RANKS
@pytest.mark.parametrize("how", ["constructor", "enable_lora"])
def test_lora_gradients_match_builtin(rank, how):
    config = dict(
        filters=4,
        kernel_size=3,
        strides=2,
        padding="same",
        dtype="float64",
        kernel_initializer="zeros",  # replaced below, and fast on JAX
    )
    if how == "constructor":
        config["lora_rank"] = 2
    shape = (2, *(7, 6, 5)[:rank], 3)
    rot_class, keras_class = LAYERS[rank]
    rot, twin = rot_class(**config), keras_class(**config)
    for layer in (rot, twin):
        layer.build(shape)
        if how == "enable_lora":
            layer.enable_lora(2)
    share_random_weights([rot, twin])
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    upstream = rng.standard_normal(rot.compute_output_shape(shape))

    y, dx, dvars = gradients(rot, x, upstream)
    y_ref, dx_ref, dvars_ref = gradients(twin, x, upstream)
    assert sorted(dvars) == ["bias", "lora_kernel_a", "lora_kernel_b"]
    assert_close(y, y_ref, FLOAT64_RTOL, "LoRA output")
    assert_close(dx, dx_ref, FLOAT64_RTOL, "LoRA dC/dx")
    for name in dvars:
        assert_close(dvars[name], dvars_ref[name], FLOAT64_RTOL, name)


def test_public_names():
    for name in ["RotConv1D", "RotConv2D", "RotConv3D"]:
        assert name in keras_rotconv.__all__
        assert getattr(keras_rotconv, name).__name__ == name
    assert keras_rotconv.__version__
