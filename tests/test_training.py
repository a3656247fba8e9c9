"""RotConv2D inside Sequential, functional and subclassed models, trained
with model.fit eagerly, compiled, and with XLA/JIT compilation: the same
weights as the Conv2D twin after the same steps."""

import keras
import numpy as np
import pytest
from conftest import FLOAT32_RTOL, assert_close, to_numpy

from keras_rotconv import RotConv2D

MODES = {
    "eager": dict(run_eagerly=True),
    "compiled": dict(jit_compile=False),
    "jit": dict(jit_compile=True),
}


def sequential(conv):
    return keras.Sequential(
        [
            keras.Input((10, 9, 2)),
            conv(4, 3, activation="relu", name="c1"),
            conv(
                6,
                3,
                strides=2,
                padding="same",
                groups=2,
                name="c2",
                activation="tanh",
            ),
            conv(6, 2, dilation_rate=(2, 1), name="c3"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="dense"),
        ]
    )


def functional(conv):
    inputs = keras.Input((10, 9, 2))
    left = conv(4, 3, padding="same", activation="relu", name="c1")(inputs)
    right = conv(4, 1, strides=1, name="c2")(inputs)
    merged = keras.layers.Concatenate()([left, right])
    x = conv(4, 3, strides=(2, 1), padding="same", groups=4, name="c3")(merged)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))


class Subclassed(keras.Model):
    def __init__(self, conv, **kwargs):
        super().__init__(**kwargs)
        self.c1 = conv(4, 3, activation="tanh", name="c1")
        self.c2 = conv(5, 2, strides=2, name="c2")
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(3, name="dense")

    def call(self, x):
        return self.dense(self.flatten(self.c2(self.c1(x))))


BUILDERS = {
    "sequential": sequential,
    "functional": functional,
    "subclassed": Subclassed,
}


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 10, 9, 2)).astype("float32")
    y = rng.integers(0, 3, size=48)
    return x, y


def _train(model, mode, x, y, epochs=2):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **MODES[mode],
    )
    history = model.fit(
        x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0
    )
    return history.history["loss"]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_fit_ends_with_conv2d_twin_weights(kind, mode):
    x, y = _data()
    rot = BUILDERS[kind](RotConv2D)
    twin = BUILDERS[kind](keras.layers.Conv2D)
    rot(x[:1])
    twin(x[:1])
    twin.set_weights(rot.get_weights())
    initial = [to_numpy(w).copy() for w in rot.weights]

    rot_losses = _train(rot, mode, x, y)
    twin_losses = _train(twin, mode, x, y)

    assert np.all(np.isfinite(rot_losses))
    assert_close(rot_losses, twin_losses, FLOAT32_RTOL, "loss curve")
    for before, mine, theirs in zip(
        initial, rot.weights, twin.weights, strict=True
    ):
        assert not np.array_equal(before, to_numpy(mine)), (
            f"{mine.path} did not train"
        )
        assert_close(
            to_numpy(mine),
            to_numpy(theirs),
            FLOAT32_RTOL,
            f"trained {mine.path}",
        )
