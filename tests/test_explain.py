"""``keras-rotconv explain``: every part of the derivation, for every option.

The parts' NumPy computations are checked against ``keras_rotconv.reference``
(the chain rule counted in loops, an oracle independent of them), and each
part's own verdict, which includes the package's rule on the current
backend, must be "equal". Configurations: a covering design in which every
pair of values of rank (1, 2), stride (1, 2), dilation (1, 2) and padding
(valid, same) meets at least once, plus the default example.
"""

import io

import keras
import numpy as np
import pytest

from keras_rotconv import reference
from keras_rotconv.tools import cli, explain

# Sums of a handful of float64 terms: rounding is ~1e-16 relative.
FLOAT64_RTOL = 1e-10

SETUPS = {
    "2d-s1-d1-valid-default": explain.Setup(),
    "1d-s1-d1-valid-k3": explain.Setup(rank=1, size=6, kernel=3),
    "1d-s2-d1-same-k3": explain.Setup(
        rank=1, size=7, kernel=3, stride=2, padding="same"
    ),
    "1d-s1-d2-same": explain.Setup(rank=1, size=5, dilation=2, padding="same"),
    "2d-s1-d1-same-k3": explain.Setup(size=4, kernel=3, padding="same"),
    "2d-s2-d1-valid-k3": explain.Setup(size=6, kernel=3, stride=2),
    "2d-s1-d2-valid": explain.Setup(size=5, kernel=2, dilation=2),
}


only_once = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the figures are drawn by matplotlib from NumPy arrays, the same "
    "on every backend: drawn under TensorFlow only",
)


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) or 1.0
    return float(np.max(np.abs(np.asarray(actual) - expected))) / scale


def assert_close(actual, expected, what: str) -> None:
    error = relative_error(actual, expected)
    assert error <= FLOAT64_RTOL, f"{what}: relative error {error:.2g}"


def batched(x):
    return np.asarray(x)[None, ..., None]


def reference_arguments(setup: explain.Setup) -> dict:
    return dict(
        strides=setup.shape(setup.stride),
        dilation=setup.shape(setup.dilation),
        padding=setup.padding,
    )


def assert_png(path) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes().startswith(b"\x89PNG"), f"{path} is not a PNG"


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
def test_every_part_agrees_with_the_rule(setup):
    out = io.StringIO()
    status = explain.run(explain.PARTS, setup, file=out)
    text = out.getvalue()
    assert status == 0, f"explain found a disagreement:\n{text}"
    assert text.count("They are equal.") == 6, text  # mlp checks two
    assert "DIFFER" not in text


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
def test_the_mlp_matrix_and_its_transpose_are_the_convolutions(setup):
    w, a = explain.kernel_values(setup), explain.input_values(setup)
    delta = explain.output_delta(setup)
    matrix = explain.dense_matrix(w, setup)
    args = reference_arguments(setup)
    z = reference.forward(batched(a), w[..., None, None], None, **args)
    assert_close(matrix @ a.ravel(), z.ravel(), "W·a")
    dx = reference.input_gradient(
        batched(delta), w[..., None, None], batched(a).shape, **args
    )
    assert_close(matrix.T @ delta.ravel(), dx.ravel(), "Wᵀ·δ")
    nonzero = matrix[matrix != 0]
    assert set(nonzero) <= set(w.ravel()), "W holds values that are not taps"


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
def test_both_input_deltas_match_the_reference(setup):
    w, delta = explain.kernel_values(setup), explain.output_delta(setup)
    expected = reference.input_gradient(
        batched(delta),
        w[..., None, None],
        (1, *setup.shape(setup.size), 1),
        **reference_arguments(setup),
    )[0, ..., 0]
    by_terms, terms = explain.chain_rule_input_delta(delta, w, setup)
    full = explain.full_convolution_rotated(delta, w, setup)
    assert_close(by_terms, expected, "chain rule")
    assert_close(full.result, expected, "full convolution")
    assert_close(full.rotated, np.flip(w), "rot180")
    links = sum(len(t) for t in terms.values())
    assert links == len(list(explain.links(setup)))


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
def test_both_kernel_gradients_match_the_reference(setup):
    a, delta = explain.input_values(setup), explain.output_delta(setup)
    expected = reference.kernel_gradient(
        batched(a),
        batched(delta),
        (*setup.shape(setup.kernel), 1, 1),
        **reference_arguments(setup),
    )[..., 0, 0]
    by_terms, _ = explain.chain_rule_kernel_gradient(a, delta, setup)
    by_correlation, _, _ = explain.valid_correlation(a, delta, setup)
    assert_close(by_terms, expected, "chain rule")
    assert_close(by_correlation, expected, "valid correlation")


def test_a_stride_spreads_the_delta_with_zeros():
    setup = SETUPS["1d-s2-d1-same-k3"]
    delta = explain.output_delta(setup)
    full = explain.full_convolution_rotated(
        delta, explain.kernel_values(setup), setup
    )
    assert full.spread.shape == (7,)
    np.testing.assert_array_equal(full.spread[::2], delta)
    assert not full.spread[1::2].any(), "no zeros between the deltas"
    out = io.StringIO()
    explain.run(["delta"], setup, file=out)
    assert "spread δ" in out.getvalue()


def test_the_chain_part_matches_finite_differences():
    net = explain.two_layers(SETUPS["2d-s2-d1-valid-k3"])
    assert net.second.out >= 1, "the input did not grow to fit two layers"
    values = explain.backpropagate(net)
    for name, grad in explain.by_finite_differences(net).items():
        error = relative_error(values[name], grad)
        assert error <= explain.FD_RTOL, f"{name}: {error:.2g}"


def test_the_default_mlp_part_shows_cut_and_shared_weights(capsys):
    assert cli.main(["explain", "--part", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "108 of 144 connections are cut" in out
    assert "w[0,0] 9x, w[0,1] 9x, w[1,0] 9x, w[1,1] 9x" in out
    assert "=== 2." not in out, "--part mlp ran other parts"


def test_the_delta_part_keeps_the_worked_example(capsys):
    assert cli.main(["explain", "--part", "delta"]) == 0
    out = capsys.readouterr().out
    assert "dC/da[1,1] = δ[0,0]·w[1,1] + δ[0,1]·w[1,0]" in out
    assert "They are equal." in out


def test_exits_1_when_the_computations_disagree(monkeypatch, capsys):
    original = explain.full_convolution_rotated

    def without_rotation(delta, w, setup):
        return original(delta, np.flip(w), setup)

    monkeypatch.setattr(explain, "full_convolution_rotated", without_rotation)
    assert cli.main(["explain", "--part", "delta"]) == 1
    assert "DIFFER" in capsys.readouterr().out


def test_exits_1_when_the_package_rule_disagrees(monkeypatch, capsys):
    original = explain.rule_kernel_gradient

    def flipped(a, delta, setup):
        return np.flip(original(a, delta, setup))

    monkeypatch.setattr(explain, "rule_kernel_gradient", flipped)
    assert cli.main(["explain", "--part", "kernel"]) == 1
    assert "DISAGREE: kernel." in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "--rank", "3"],
        ["explain", "--part", "everything"],
        ["explain", "--stride", "0"],
    ],
    ids=["rank-3", "unknown-part", "zero-stride"],
)
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "3", "--kernel", "4"], "more than the input"),
        (["--stride", "2", "--dilation", "2"], "refused by Keras"),
    ],
    ids=["kernel-wider-than-input", "stride-and-dilation"],
)
def test_impossible_layers_exit_2(argv, message, capsys):
    assert cli.main(["explain", *argv]) == 2
    assert message in capsys.readouterr().err


@only_once
def test_plot_writes_one_figure_per_part(tmp_path, capsys):
    figure = tmp_path / "explain.png"
    assert cli.main(["explain", "--rank", "1", "--plot", str(figure)]) == 0
    out = capsys.readouterr().out
    for part in explain.PARTS:
        path = tmp_path / f"explain-{part}.png"
        assert_png(path)
        assert f"Figure written to {path}\n" in out
    assert cli.main(["explain", "--part", "mlp", "--plot", str(figure)]) == 0
    assert_png(figure)
    assert f"Figure written to {figure}\n" in capsys.readouterr().out


@only_once
def test_a_plot_path_without_suffix_prints_the_file_written(tmp_path, capsys):
    figure = tmp_path / "x"
    assert cli.main(["explain", "--part", "bias", "--plot", str(figure)]) == 0
    assert_png(tmp_path / "x.png")
    out = capsys.readouterr().out
    assert f"Figure written to {figure}.png\n" in out
