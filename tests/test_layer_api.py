"""RotConv2D behaves as keras.layers.Conv2D does: arguments, errors, shapes,
configuration, saving, LoRA, regularizers, and use inside models."""

import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import (
    FLOAT32_RTOL,
    FLOAT64_RTOL,
    assert_close,
    gradients,
    make_twins,
    share_random_weights,
    to_numpy,
)

import keras_rotconv
from keras_rotconv import RotConv2D


def _zeros(*shape):
    return np.zeros(shape, dtype="float32")


def _call_twice(layer, first, second):
    layer(first)
    layer(second)


BAD_INPUT = {
    "input-rank-3": lambda cls: cls(2, 3)(_zeros(2, 5, 5)),
    "input-rank-5": lambda cls: cls(2, 3)(_zeros(2, 5, 5, 5, 1)),
    "channels-differ-from-built-kernel": lambda cls: _call_twice(
        cls(2, 3), _zeros(1, 5, 5, 3), _zeros(1, 5, 5, 4)
    ),
    "filters-not-divisible-by-groups": lambda cls: cls(3, 3, groups=2),
    "channels-not-divisible-by-groups": lambda cls: cls(4, 3, groups=2)(
        _zeros(1, 5, 5, 3)
    ),
    "strides-with-dilation": lambda cls: cls(2, 3, strides=2, dilation_rate=2),
    "causal-padding": lambda cls: cls(2, 3, padding="causal"),
    "unknown-padding": lambda cls: cls(2, 3, padding="full"),
    # Keras 3 accepts a tuple at construction and rejects it when called.
    "explicit-padding-tuple": lambda cls: cls(2, 3, padding=((1, 2), (0, 1)))(
        _zeros(1, 5, 5, 1)
    ),
    "unknown-data-format": lambda cls: cls(2, 3, data_format="nhwc"),
    "kernel-larger-than-valid-input": lambda cls: cls(2, 5)(_zeros(1, 4, 6, 1)),
    "dilated-kernel-larger-than-input": lambda cls: cls(2, 3, dilation_rate=3)(
        _zeros(1, 6, 9, 1)
    ),
    "kernel-larger-than-symbolic-input": lambda cls: cls(2, 5)(
        keras.Input((4, 6, 1))
    ),
    "kernel-larger-channels-first": lambda cls: cls(
        2, 5, data_format="channels_first"
    )(_zeros(1, 1, 4, 6)),
    "kernel-larger-than-later-input": lambda cls: _call_twice(
        cls(2, 3), _zeros(1, 5, 5, 1), _zeros(1, 2, 5, 1)
    ),
    "filters-zero": lambda cls: cls(0, 3),
    "filters-negative": lambda cls: cls(-1, 3),
    "kernel-size-zero": lambda cls: cls(2, 0),
    "kernel-size-negative": lambda cls: cls(2, (3, -1)),
    "kernel-size-three-axes": lambda cls: cls(2, (3, 3, 3)),
    "strides-zero": lambda cls: cls(2, 3, strides=0),
    "dilation-zero": lambda cls: cls(2, 3, dilation_rate=0),
    "groups-zero": lambda cls: cls(2, 3, groups=0),
    "filters-string": lambda cls: cls("2", 3),
    "unknown-activation": lambda cls: cls(2, 3, activation="nope"),
}


def _raised(make, cls):
    try:
        make(cls)
    except Exception as error:
        return error
    return None


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_raises_as_conv2d_does(case):
    expected = _raised(BAD_INPUT[case], keras.layers.Conv2D)
    raised = _raised(BAD_INPUT[case], RotConv2D)
    assert expected is not None, f"Conv2D accepts {case}; update the table"
    assert type(raised) is type(expected), (
        f"{case}: RotConv2D raised {raised!r}, Conv2D raised {expected!r}"
    )


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("strides-with-dilation", ["strides=(2, 2)", "dilation_rate=(2, 2)"]),
        ("filters-not-divisible-by-groups", ["groups=2", "filters=3"]),
        ("filters-zero", ["filters=0"]),
        ("causal-padding", ["causal"]),
        ("kernel-larger-than-valid-input", ["(1, 4, 6, 1)", "5, 5"]),
        ("kernel-larger-than-later-input", ["(1, 2, 5, 1)", "kernel_size"]),
    ],
)
def test_error_names_the_argument_and_value(case, names):
    message = str(_raised(BAD_INPUT[case], RotConv2D))
    for name in names:
        assert name in message, f"{name!r} missing from: {message}"


@pytest.mark.parametrize(
    "shape", [(0, 6, 6, 2), (2, 0, 6, 2)], ids=["empty-batch", "empty-rows"]
)
def test_empty_input_gives_empty_output_like_conv2d(shape):
    rot, twin = make_twins(
        RotConv2D,
        keras.layers.Conv2D,
        dict(filters=3, kernel_size=3, padding="same"),
        shape,
    )
    x = _zeros(*shape)
    assert to_numpy(rot(x)).shape == to_numpy(twin(x)).shape


SHAPE_CASES = [
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
]


@pytest.mark.parametrize(("config", "shape"), SHAPE_CASES)
def test_output_shapes_match_conv2d(config, shape):
    rot = RotConv2D(**config)
    twin = keras.layers.Conv2D(**config)
    assert rot.compute_output_shape(shape) == twin.compute_output_shape(shape)
    symbolic = keras.Input(batch_shape=(None, *shape[1:]))
    assert rot(symbolic).shape == twin(symbolic).shape
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    assert tuple(to_numpy(rot(x)).shape) == tuple(
        rot.compute_output_shape(shape)
    )


FULL_CONFIG = dict(
    filters=6,
    kernel_size=(3, 2),
    strides=(2, 1),
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


def test_config_equals_conv2d_config():
    rot_config = RotConv2D(**FULL_CONFIG, name="x").get_config()
    twin_config = keras.layers.Conv2D(**FULL_CONFIG, name="x").get_config()
    assert rot_config == twin_config


def test_default_config_equals_conv2d_defaults():
    rot_config = RotConv2D(4, 3, name="x").get_config()
    assert rot_config == keras.layers.Conv2D(4, 3, name="x").get_config()


def test_from_config_round_trip():
    layer = RotConv2D(**FULL_CONFIG)
    clone = RotConv2D.from_config(layer.get_config())
    assert isinstance(clone, RotConv2D)
    assert clone.get_config() == layer.get_config()


def test_registered_for_saving():
    assert (
        keras.saving.get_registered_name(RotConv2D) == "keras_rotconv>RotConv2D"
    )
    assert keras.saving.get_registered_object("keras_rotconv>RotConv2D") is (
        RotConv2D
    )


def _small_model(conv):
    return keras.Sequential(
        [
            keras.Input((9, 8, 2)),
            conv(4, 3, activation="relu", name="c1"),
            conv(6, 3, strides=2, padding="same", groups=2, name="c2"),
            conv(
                6,
                2,
                dilation_rate=2,
                data_format="channels_first",
                activation="tanh",
                name="c3",
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="dense"),
        ]
    )


def test_keras_file_round_trip(tmp_path):
    model = _small_model(RotConv2D)
    x = np.random.default_rng(0).standard_normal((5, 9, 8, 2)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [
        type(layer) for layer in model.layers
    ]
    for saved, restored in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(to_numpy(saved), to_numpy(restored)), saved.path
    assert np.array_equal(to_numpy(model(x)), to_numpy(loaded(x)))


def test_keras_file_loads_in_a_fresh_process(tmp_path):
    """Importing keras_rotconv registers the layers, so a new process loads
    the file with no custom_objects and no custom_object_scope."""
    path = tmp_path / "model.keras"
    model = _small_model(RotConv2D)
    model.save(path)
    x = np.random.default_rng(0).standard_normal((2, 9, 8, 2)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import keras, numpy, keras_rotconv;"
        f"m = keras.saving.load_model({str(path)!r});"
        f"y = m(numpy.load({str(tmp_path / 'x.npy')!r}));"
        f"numpy.save({str(tmp_path / 'y.npy')!r},"
        " keras.ops.convert_to_numpy(y))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "y.npy"), to_numpy(model(x)))


def test_regularizer_losses_match_conv2d():
    config = dict(
        filters=3,
        kernel_size=3,
        kernel_regularizer=keras.regularizers.L2(0.1),
        bias_regularizer=keras.regularizers.L1(0.2),
        activity_regularizer=keras.regularizers.L2(0.3),
    )
    rot, twin = make_twins(RotConv2D, keras.layers.Conv2D, config, (2, 6, 6, 2))
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 2)).astype("float32")
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


@pytest.mark.parametrize("how", ["constructor", "enable_lora"])
def test_lora_gradients_match_conv2d(how):
    config = dict(
        filters=4, kernel_size=3, strides=2, padding="same", dtype="float64"
    )
    if how == "constructor":
        config["lora_rank"] = 2
    shape = (2, 7, 6, 3)
    rot, twin = RotConv2D(**config), keras.layers.Conv2D(**config)
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
    assert "RotConv2D" in keras_rotconv.__all__
    assert keras_rotconv.__version__
