"""The example CNN for MNIST and Fashion-MNIST, in one place.

``keras-rotconv train``, ``examples/mnist_rotconv.py`` and
``examples/compare_with_conv2d.py`` all build it from here, so the figures in
the README describe the model the examples run.
"""

from __future__ import annotations

import keras

from keras_rotconv.layers import RotConv2D

# Epochs that reach the accuracy the README states, per data set.
EPOCHS = {"mnist": 5, "fashion_mnist": 8}
BATCH_SIZE = 128
LEARNING_RATE = 1e-3

CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}


def mnist_model(conv: type = RotConv2D) -> keras.Sequential:
    """A small CNN for 28x28 grey images and 10 classes.

    ``conv`` is the convolution layer class: RotConv2D, or
    ``keras.layers.Conv2D`` for the built-in twin.
    """
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            conv(32, 3, activation="relu"),
            keras.layers.BatchNormalization(momentum=0.9),
            conv(32, 3, activation="relu"),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.MaxPooling2D(),
            conv(64, 3, activation="relu"),
            keras.layers.BatchNormalization(momentum=0.9),
            conv(64, 3, activation="relu"),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name=f"mnist_{conv.__name__.lower()}",
    )


def compile_model(model: keras.Model, total_steps: int) -> keras.Model:
    """Adam whose learning rate decays to zero along a cosine over
    ``total_steps`` training steps, cross-entropy loss, accuracy."""
    schedule = keras.optimizers.schedules.CosineDecay(
        LEARNING_RATE, decay_steps=total_steps
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
