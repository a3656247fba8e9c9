"""``examples/derivation.ipynb`` runs from top to bottom, as saved.

The notebook computes its gradients with ``tf.GradientTape``, so it runs
under TensorFlow only; its last cells train on the original MNIST files in
``../shared/data/mnist`` (skipped, saying why, where that folder is absent;
failed instead when ``CI`` is set, as in test_mnist.py).
"""

import os
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "derivation.ipynb"
MNIST = ROOT.parent / "shared" / "data" / "mnist"

# A cell that runs longer than this has hung: the whole notebook takes about
# 25 s on a loaded 2-core machine.
CELL_TIMEOUT = 120

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the notebook uses the TensorFlow backend (tf.GradientTape) "
    "whatever KERAS_BACKEND says: run under TensorFlow only",
)


def test_the_saved_notebook_holds_the_outputs_of_one_run():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"cells were not run once, in order: {counts}"
    )
    for cell in code:
        assert cell.outputs, f"cell {cell.execution_count} has no output"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {cell.execution_count} saved an error"
    images = [o for o in code[-1].outputs if "image/png" in o.get("data", {})]
    assert images, "the learning curves' figure is not saved"


def test_the_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        message = f"the original MNIST files are not in {MNIST}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(f"{message} (a clone without the shared/ folder)")
    # The kernel is a child process and inherits the environment.
    monkeypatch.setenv("MNIST_DIR", str(MNIST))
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    # A failing cell raises CellExecutionError, which fails the test.
    client.execute()
    last = notebook.cells[-1].outputs
    text = "".join(o.get("text", "") for o in last)
    assert "largest difference between the two curves" in text
