"""The ``keras-rotconv`` command: verify, explain, and argument handling.

None of these tests needs data or network; the training runs on real MNIST
are in test_mnist.py.
"""

import importlib
import re
import runpy
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from keras_rotconv import ops as rotconv_ops
from keras_rotconv import reference
from keras_rotconv.tools import cli, explain, verify

ROOT = Path(__file__).resolve().parents[1]

# The worked example's sums have a handful of terms; float64 rounding of
# them is ~1e-16 relative.
FLOAT64_RTOL = 1e-10


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    content = path.read_bytes()
    assert content.startswith(b"\x89PNG\r\n\x1a\n"), f"{path} is not a PNG"
    assert len(content) > 1000, f"{path} is only {len(content)} bytes"


def relative_error(actual, expected) -> float:
    scale = np.max(np.abs(expected))
    return float(np.max(np.abs(np.asarray(actual) - expected)) / scale)


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


def test_explain_shows_equal_deltas_and_writes_the_figure(tmp_path, capsys):
    figure = tmp_path / "explain.png"
    assert cli.main(["explain", "--plot", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "They are equal." in out
    assert "dC/da[1,1] = δ[0,0]·w[1,1] + δ[0,1]·w[1,0]" in out
    assert_png(figure)


def test_explain_sums_and_full_convolution_match_the_reference():
    rng = np.random.default_rng(3)
    delta = rng.standard_normal((4, 5))
    w = rng.standard_normal((3, 2))
    by_terms, terms = explain.chain_rule_sums(delta, w)
    by_conv, _, _ = explain.full_convolution_rotated(delta, w)
    expected = reference.input_gradient(
        delta[None, :, :, None],
        w[:, :, None, None],
        (1, 6, 6, 1),
        strides=(1, 1),
        dilation=(1, 1),
        padding="valid",
    )[0, :, :, 0]
    assert relative_error(by_terms, expected) <= FLOAT64_RTOL
    assert relative_error(by_conv, expected) <= FLOAT64_RTOL
    assert relative_error(explain.layer_rule(delta, w), expected) <= (
        FLOAT64_RTOL
    )
    # Every (output position, tap) pair lands on exactly one input position.
    assert sum(len(t) for t in terms.values()) == delta.size * w.size


def test_explain_exits_1_when_the_computations_disagree(monkeypatch, capsys):
    original = explain.full_convolution_rotated

    def without_rotation(delta, w):
        return original(delta, w[::-1, ::-1])

    monkeypatch.setattr(explain, "full_convolution_rotated", without_rotation)
    assert explain.run() == 1
    assert "DIFFER" in capsys.readouterr().out


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
    TF32 off while it differentiates, and turns it back on after."""
    if keras.backend.backend() == "torch":
        import torch

        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(True)
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
