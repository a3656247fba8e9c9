"""The MNIST-like model with RotConv2D layers through XLA compilation,
SavedModel export and serving, and resuming training from a .keras file."""

import subprocess
import sys
from pathlib import Path

import keras
import mnist_like
import numpy as np
import pytest
from conftest import BACKEND, FLOAT32_RTOL, assert_close, child_environment

from keras_rotconv import RotConv2D

if BACKEND != "tensorflow":
    pytest.skip(
        "jit_compile, SavedModel export and deterministic ops are checked on "
        "TensorFlow",
        allow_module_level=True,
    )

import tensorflow as tf

RESUME_WORKER = Path(__file__).with_name("resume_worker.py")


def _trained(**compile_kwargs):
    model = mnist_like.compile_for_sgd(
        mnist_like.model(RotConv2D), **compile_kwargs
    )
    model.set_weights(mnist_like.initial_weights())
    x, y = mnist_like.data(48)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model


def test_jit_compiled_training_equals_eager_training():
    """XLA fuses and reorders the float32 arithmetic, so equal within
    float32 rounding, not bit for bit."""
    eager = _trained(run_eagerly=True).get_weights()
    compiled = _trained(jit_compile=True).get_weights()
    initial = mnist_like.initial_weights()
    for i, (mine, theirs) in enumerate(zip(compiled, eager, strict=True)):
        assert not np.array_equal(theirs, initial[i]), f"weight {i} untrained"
        assert_close(mine, theirs, FLOAT32_RTOL, f"jit-compiled weight {i}")


def test_exported_saved_model_serves_the_same_predictions(tmp_path):
    """``model.export`` writes a SavedModel that TensorFlow alone serves:
    no Keras and no keras_rotconv in the loop, the traced graph only."""
    model = _trained()
    model.export(tmp_path / "exported", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    x, _ = mnist_like.data(10, seed=1)
    expected = model.predict(x, verbose=0)
    actual = served.serve(tf.constant(x)).numpy()
    assert np.array_equal(actual, expected), np.max(np.abs(actual - expected))


def test_keras_file_loads_with_safe_mode(tmp_path):
    """safe_mode=True refuses to deserialize Python code (lambdas); every
    part of a RotConv2D configuration is plain data."""
    model = keras.Sequential(
        [
            keras.Input((9, 9, 2)),
            RotConv2D(
                4,
                3,
                activation="gelu",
                kernel_regularizer=keras.regularizers.L2(1e-3),
                bias_constraint=keras.constraints.NonNeg(),
                lora_rank=2,
            ),
        ]
    )
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 2))
    assert np.array_equal(loaded(x), model(x))


def test_resuming_from_a_keras_file_equals_training_straight(tmp_path):
    """Two epochs straight against one epoch, save, load (safe_mode=True),
    one more epoch: the same weights and optimizer state, bit for bit, with
    deterministic ops (in a process of its own, where they can stay on).
    Restarting the optimizer instead must change the result, or the
    comparison would not show that its state was restored."""
    result = subprocess.run(
        [sys.executable, str(RESUME_WORKER), str(tmp_path)],
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = dict(np.load(tmp_path / "results.npz"))

    def state(name):
        count = sum(1 for key in results if key.startswith(f"{name}/"))
        return [results[f"{name}/{i}"] for i in range(count)]

    straight, resumed = state("straight"), state("resumed")
    assert len(straight) == len(resumed) > len(mnist_like.initial_weights())
    for i, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        assert np.array_equal(a, b), f"variable {i} differs after resuming"
    restarted = state("restarted")
    assert any(not np.array_equal(a, b) for a, b in zip(straight, restarted)), (
        "a restarted optimizer gave the same weights"
    )
