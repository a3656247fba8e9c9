"""Train a RotConv2D CNN on MNIST (or Fashion-MNIST) with model.fit.

The model is a plain ``keras.Sequential`` whose convolutions are RotConv2D
layers: the same forward pass as ``keras.layers.Conv2D``, with the backward
pass of the textbook derivation. It is trained, evaluated on the test split,
saved as a ``.keras`` file, loaded back (no ``custom_objects``: RotConv2D is
registered with Keras) and evaluated again.

    python examples/mnist_rotconv.py
    python examples/mnist_rotconv.py --dataset fashion_mnist
    python examples/mnist_rotconv.py --manual-dir /path/to/mnist  # offline

``--manual-dir`` names a folder holding the four original IDX files
(``train-images-idx3-ubyte.gz`` and so on); without it, TensorFlow Datasets
downloads them.
"""

from __future__ import annotations

import argparse
import sys
import time

import keras

import keras_rotconv
from keras_rotconv.tools import data, models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=data.DATASETS, default="mnist")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--manual-dir", metavar="DIR")
    parser.add_argument("--data-dir", metavar="DIR")
    parser.add_argument("--output", default="mnist_rotconv.keras")
    parser.add_argument(
        "--train-size", type=int, metavar="N", help="first N images only"
    )
    parser.add_argument(
        "--test-size", type=int, metavar="N", help="first N images only"
    )
    args = parser.parse_args()
    epochs = args.epochs or models.EPOCHS[args.dataset]

    data.quiet()
    try:
        train, test = data.load(
            args.dataset,
            manual_dir=args.manual_dir,
            data_dir=args.data_dir,
            train_size=args.train_size,
            test_size=args.test_size,
        )
    except data.DataUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    keras.utils.set_random_seed(0)
    model = models.mnist_model(conv=keras_rotconv.RotConv2D)
    models.compile_model(model, total_steps=epochs * len(train))
    model.summary()

    start = time.perf_counter()
    # The data pipeline shuffles the training set itself, every epoch.
    model.fit(train, epochs=epochs, validation_data=test, shuffle=False)
    minutes = (time.perf_counter() - start) / 60
    _, accuracy = model.evaluate(test, verbose=0)
    print(f"{args.dataset}: {epochs} epochs in {minutes:.1f} min")
    print(f"test accuracy: {accuracy:.4f}")

    model.save(args.output)
    reloaded = keras.saving.load_model(args.output)
    _, reloaded_accuracy = reloaded.evaluate(test, verbose=0)
    print(f"reloaded from {args.output}: test accuracy {reloaded_accuracy:.4f}")
    if reloaded_accuracy != accuracy:
        print("error: the reloaded model scores differently", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
