"""A small MNIST-shaped model and learnable synthetic data, shared by the
tests that train one (distributed, mixed precision, export and resume) and
by the worker processes they start."""

import keras
import numpy as np

IMAGE_SHAPE = (28, 28, 1)
CLASSES = 10


def model(conv, *, dtype=None) -> keras.Model:
    """Two conv layers of class ``conv``, pooling and a dense classifier
    whose logits are float32 under any policy, as Keras's mixed precision
    guide advises."""
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            conv(8, 3, activation="relu", name="c1", dtype=dtype),
            conv(
                16,
                3,
                strides=2,
                padding="same",
                activation="relu",
                name="c2",
                dtype=dtype,
            ),
            keras.layers.GlobalAveragePooling2D(dtype=dtype),
            keras.layers.Dense(CLASSES, name="logits", dtype="float32"),
        ]
    )


def data(count: int, seed: int = 0):
    """``count`` images of ten classes, each class a fixed random pattern
    under noise: a model can learn them, and quickly."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((CLASSES, *IMAGE_SHAPE))
    labels = rng.integers(0, CLASSES, size=count)
    noise = rng.standard_normal((count, *IMAGE_SHAPE))
    images = patterns[labels] + 0.5 * noise
    return images.astype("float32"), labels


def compile_for_sgd(model, **kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def initial_weights(seed: int = 0):
    """The same starting weights in every process: Keras's initializers
    for the kernels, and random biases, so that a bias's trained value is
    compared at the scale of a weight rather than of a few small updates
    from zero."""
    from keras_rotconv import RotConv2D

    keras.utils.set_random_seed(seed)
    weights = model(RotConv2D).get_weights()
    rng = np.random.default_rng(seed)
    return [
        w
        if w.ndim > 1
        else (0.1 * rng.standard_normal(w.shape)).astype(w.dtype)
        for w in weights
    ]
