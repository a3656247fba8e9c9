"""The ``keras-rotconv`` command: verify and argument handling.

None of these tests needs data or network; the training runs on real MNIST
are in test_mnist.py, and ``explain`` is tested in test_explain.py.
"""

import contextlib
import importlib
import re
import runpy
import sys
from pathlib import Path

import keras
import pytest
from keras import ops

from keras_rotconv import ops as rotconv_ops
from keras_rotconv.tools import cli, verify

ROOT = Path(__file__).resolve().parents[1]


def test_verify_passes_on_every_configuration(capsys):
    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    for case in verify.GRID:
        assert case.name in out, f"no row for {case.name}"
    assert "FAIL" not in out
    assert (
        f"{len(verify.GRID)} of {len(verify.GRID)} configurations agree" in out
    )


def input_delta_without_rotation(delta, w, *args, **kwargs):
    """The textbook mistake: the full convolution with the kernel as it is.
    Flipping the kernel first undoes the rotation inside ``input_delta``."""
    rank = len(w.shape) - 2
    flipped = ops.flip(w, axis=tuple(range(rank)))
    return ORIGINAL["input_delta"](delta, flipped, *args, **kwargs)


def kernel_gradient_flipped(*args, **kwargs):
    """A convolution where a correlation belongs."""
    grad = ORIGINAL["kernel_gradient"](*args, **kwargs)
    rank = len(grad.shape) - 2
    return ops.flip(grad, axis=tuple(range(rank)))


def bias_gradient_averaged(delta):
    """The mean of the delta where its sum belongs."""
    axes = tuple(range(len(delta.shape) - 1))
    return ops.mean(delta, axis=axes)


ORIGINAL = {
    name: getattr(rotconv_ops, name)
    for name in ("input_delta", "kernel_gradient", "bias_gradient")
}


def failing_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if "FAIL" in line]


def test_verify_exits_1_when_the_input_delta_forgets_the_rotation(
    monkeypatch, capsys
):
    monkeypatch.setattr(
        rotconv_ops, "input_delta", input_delta_without_rotation
    )
    assert cli.main(["verify"]) == 1
    rows = failing_rows(capsys.readouterr().out)
    assert rows, "no configuration failed"
    for row in rows:
        assert row.endswith("FAIL (dx)"), f"only dx should fail: {row}"
    # A 1x1 kernel is its own rotation, so that row must still pass.
    assert not any(row.startswith("k1x1") for row in rows)


@pytest.mark.parametrize(
    "rule, broken, quantity",
    [
        ("kernel_gradient", kernel_gradient_flipped, "dw"),
        ("bias_gradient", bias_gradient_averaged, "db"),
    ],
    ids=["kernel-gradient-flipped", "bias-gradient-averaged"],
)
def test_verify_names_the_broken_gradient(monkeypatch, rule, broken, quantity):
    monkeypatch.setattr(rotconv_ops, rule, broken)
    cases = [
        verify.Case(),
        verify.Case(strides=(2, 2), padding="same", spatial=(10, 9)),
        verify.Case(dtype="float64", dilation_rate=(2, 2), groups=2),
    ]
    results = [verify.check(case) for case in cases]
    for result in results:
        assert result.failed() == [quantity], (
            f"{result.case.name}: expected only {quantity} to fail, "
            f"errors {result.errors}"
        )


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epochs", "0"],
        ["train", "--dataset", "cifar10"],
        ["train", "--train-size", "-5"],
        ["frobnicate"],
    ],
    ids=["zero-epochs", "unknown-dataset", "negative-size", "unknown-command"],
)
def test_bad_arguments_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_python_m_keras_rotconv_lists_the_commands(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["keras-rotconv", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("keras_rotconv", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("verify", "train", "explain"):
        assert command in out


def test_the_console_script_is_the_cli_main():
    pyproject = (ROOT / "pyproject.toml").read_text()
    entry = re.search(r'^keras-rotconv = "(.+)"$', pyproject, re.M)
    assert entry, "pyproject.toml declares no keras-rotconv script"
    module, _, name = entry.group(1).partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main


def _tf32_allowed() -> bool:
    """Whether the current backend may round float32 products to TF32."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.tensor_float_32_execution_enabled()
    if backend == "jax":
        import jax

        return jax.config.jax_default_matmul_precision != "highest"
    import torch

    return (
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    )


def test_verify_compares_without_tf32_and_restores_the_setting(monkeypatch):
    """On a GPU, TF32 made the built-in Conv2D's float32 dx 3.1e-4 off (an
    H100 under torch's defaults); verify checks the arithmetic, so it turns
    TF32 off while it differentiates, and turns it back on after. (The
    suite runs with TF32 off: conftest.py; it is allowed here.)"""
    with _tf32_allowing(monkeypatch):
        _verify_turns_tf32_off_and_back_on(monkeypatch)


@contextlib.contextmanager
def _tf32_allowing(monkeypatch):
    """TF32 allowed in the current backend; the setting restored after."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        yield
    elif backend == "tensorflow":
        import tensorflow as tf

        saved = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(True)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(saved)
    else:
        import jax

        with jax.default_matmul_precision("tensorfloat32"):
            yield


def _verify_turns_tf32_off_and_back_on(monkeypatch):
    assert _tf32_allowed()
    seen = []
    differentiate = verify._value_and_gradients

    def recording(*args):
        seen.append(_tf32_allowed())
        return differentiate(*args)

    monkeypatch.setattr(verify, "_value_and_gradients", recording)
    assert not verify.check(verify.Case()).failed()
    assert seen == [False, False]
    assert _tf32_allowed()
