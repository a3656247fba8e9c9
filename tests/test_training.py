"""RotConv layers inside Sequential, functional and subclassed models,
trained with model.fit eagerly, compiled, and with the backend's own
compilation (jit_compile=True: XLA on TensorFlow, jax.jit on JAX,
torch.compile on torch): the same weights as the built-in twin after the
same steps."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, FLOAT32_RTOL, LAYERS, assert_close, to_numpy

MODES = {
    "eager": dict(run_eagerly=True),
    "compiled": dict(jit_compile=False),
    "jit": dict(jit_compile=True),
}


def sequential(layers):
    conv = layers[2]
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


def functional(layers):
    conv = layers[2]
    inputs = keras.Input((10, 9, 2))
    left = conv(4, 3, padding="same", activation="relu", name="c1")(inputs)
    right = conv(4, 1, strides=1, name="c2")(inputs)
    merged = keras.layers.Concatenate()([left, right])
    x = conv(4, 3, strides=(2, 1), padding="same", groups=4, name="c3")(merged)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))


class Subclassed(keras.Model):
    def __init__(self, layers, **kwargs):
        super().__init__(**kwargs)
        conv = layers[2]
        self.c1 = conv(4, 3, activation="tanh", name="c1")
        self.c2 = conv(5, 2, strides=2, name="c2")
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(3, name="dense")

    def call(self, x):
        return self.dense(self.flatten(self.c2(self.c1(x))))


def all_ranks(layers):
    """RotConv1D, RotConv2D and RotConv3D (or the built-in layers) side by
    side, one input each."""
    inputs = [keras.Input(shape) for shape in ALL_RANKS_SHAPES]
    one = layers[1](4, 3, padding="causal", activation="relu", name="c1")(
        inputs[0]
    )
    one = layers[1](6, 3, strides=2, groups=2, padding="same", name="c1b")(one)
    two = layers[2](4, 3, strides=2, padding="same", name="c2")(inputs[1])
    three = layers[3](4, (2, 3, 1), dilation_rate=(1, 1, 2), name="c3")(
        inputs[2]
    )
    three = layers[3](
        6, 2, strides=(1, 2, 1), padding="same", groups=2, name="c3b"
    )(three)
    merged = keras.layers.Concatenate()(
        [keras.layers.Flatten()(x) for x in (one, two, three)]
    )
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(merged))


ALL_RANKS_SHAPES = [(16, 2), (10, 9, 2), (6, 5, 5, 2)]
# name: (builder, input shapes of one sample)
BUILDERS = {
    "sequential": (sequential, [(10, 9, 2)]),
    "functional": (functional, [(10, 9, 2)]),
    "subclassed": (Subclassed, [(10, 9, 2)]),
    "all-ranks": (all_ranks, ALL_RANKS_SHAPES),
}
ROT = {rank: classes[0] for rank, classes in LAYERS.items()}
BUILTIN = {rank: classes[1] for rank, classes in LAYERS.items()}


def _data(sample_shapes):
    # 40 samples in batches of 16: the last batch of each epoch is smaller,
    # so compiled steps meet a second batch size.
    rng = np.random.default_rng(0)
    x = [
        rng.standard_normal((40, *shape)).astype("float32")
        for shape in sample_shapes
    ]
    y = rng.integers(0, 3, size=40)
    return (x[0] if len(x) == 1 else x), y


def _first(x):
    return x[:1] if isinstance(x, np.ndarray) else [a[:1] for a in x]


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


TORCH_JIT_SKIP = (
    "torch.compile takes a minute or two per small model on a CPU: on torch, "
    "the all-ranks model alone trains with jit_compile=True"
)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_fit_ends_with_builtin_twin_weights(kind, mode):
    if BACKEND == "torch" and mode == "jit" and kind != "all-ranks":
        pytest.skip(TORCH_JIT_SKIP)
    build, sample_shapes = BUILDERS[kind]
    x, y = _data(sample_shapes)
    rot = build(ROT)
    twin = build(BUILTIN)
    rot(_first(x))
    twin(_first(x))
    twin.set_weights(rot.get_weights())
    initial = [to_numpy(w).copy() for w in rot.weights]

    if BACKEND == "torch" and mode == "jit":
        import torch

        # A fresh compilation cache: torch.compile caches train_step, which
        # every model shares, and falls back to eager once a function has
        # been recompiled eight times.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        rot_losses = _train(rot, mode, x, y)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
        # The twin's mode does not change what it computes, and a second
        # torch.compile would double the cost.
        twin_losses = _train(twin, "compiled", x, y)
    else:
        rot_losses = _train(rot, mode, x, y)
        twin_losses = _train(twin, mode, x, y)
    assert rot.jit_compile == (mode == "jit")

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
