"""The process test_export_resume.py starts to train with deterministic
ops, which, once enabled, stay enabled for the whole process:

    python tests/resume_worker.py DIRECTORY

Trains the MNIST-like model with Adam (whose moment estimates are state
that a resumed run must get back) three ways and saves the weights and the
optimizer's variables of each to DIRECTORY/results.npz.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import mnist_like
import numpy as np
import tensorflow as tf

from keras_rotconv import RotConv2D


def _model(weights):
    model = mnist_like.model(RotConv2D)
    model.set_weights(weights)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit_one_epoch(model, x, y):
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)


def _state(model):
    return [np.asarray(v) for v in model.weights + model.optimizer.variables]


def main(directory: Path):
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    weights = mnist_like.initial_weights()
    x, y = mnist_like.data(48)

    straight = _model(weights)
    _fit_one_epoch(straight, x, y)
    _fit_one_epoch(straight, x, y)

    resumed = _model(weights)
    _fit_one_epoch(resumed, x, y)
    resumed.save(directory / "after_one_epoch.keras")
    resumed = keras.saving.load_model(
        directory / "after_one_epoch.keras", safe_mode=True
    )
    _fit_one_epoch(resumed, x, y)

    # The weights alone, in a freshly compiled model: the optimizer starts
    # over, and that must show.
    restarted = _model(
        keras.saving.load_model(
            directory / "after_one_epoch.keras", safe_mode=True
        ).get_weights()
    )
    _fit_one_epoch(restarted, x, y)

    results = {}
    for name, model in [
        ("straight", straight),
        ("resumed", resumed),
        ("restarted", restarted),
    ]:
        results.update({f"{name}/{i}": v for i, v in enumerate(_state(model))})
    np.savez(directory / "results.npz", **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
