"""Figures are written where the printed path says.

``python examples/compare_with_conv2d.py --output /tmp/x`` printed
``wrote /tmp/x`` while matplotlib wrote ``/tmp/x.png``: every figure
function returns the file it wrote, and the callers print that.
"""

import keras
import pytest

from keras_rotconv.tools import plots

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="matplotlib draws the same on every backend: run under TensorFlow "
    "only",
)

HISTORY = {
    "loss": [1.0, 0.5],
    "accuracy": [0.6, 0.8],
    "val_loss": [0.9, 0.6],
    "val_accuracy": [0.7, 0.8],
}


@pytest.mark.parametrize("name", ["x", "x.png"], ids=["no-suffix", "png"])
def test_the_returned_path_is_the_file_written(tmp_path, name):
    written = plots.comparison_figure(
        {"RotConv2D": HISTORY, "Conv2D": HISTORY}, tmp_path / name, "twins"
    )
    assert written == tmp_path / "x.png"
    assert written.is_file()
    assert not (tmp_path / "x").exists()
