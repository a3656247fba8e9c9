"""Convert a keras.applications model to the derived rules and train it next
to the original.

The model is built with ``weights=None`` (random weights, nothing
downloaded), converted with ``keras_rotconv.convert``, and both models,
with the same weights, train on the same batches of MNIST, resized and
repeated to three channels. The script prints

1. what ``convert`` replaced,
2. a table of the first step's gradients, weight by weight: the converted
   model's against the original's, relative to the largest original value,
3. both models' losses and accuracies, epoch by epoch.

The two float32 trainings drift apart after a few steps: a randomly
initialised network trained at this learning rate amplifies rounding
differences (measured: in float64 the two models' weights still agree to
1e-14 after six steps; in float32 the losses part at the fourth).

On TensorFlow, the first training step of a model with depthwise
convolutions takes minutes to start (the depthwise kernel gradient is
one convolution per channel in the graph); later steps run at the
original's speed.

    python examples/convert_model.py --epochs 1 --train-size 2048
    python examples/convert_model.py --manual-dir /path/to/mnist
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np
import tensorflow as tf

import keras_rotconv
from keras_rotconv.tools import data

APPLICATIONS = {
    "MobileNetV2": keras.applications.MobileNetV2,
    "ResNet50": keras.applications.ResNet50,
    "EfficientNetB0": keras.applications.EfficientNetB0,
    "ConvNeXtTiny": keras.applications.ConvNeXtTiny,
}
# A float32 gradient computed two ways, each rounding on its own: agreement
# to about 1e-5 of the largest value.
TOLERANCE = 1e-5
# The first step's gradients are compared in inference mode (batch
# normalization with its moving statistics). In training mode, a batch
# normalization followed by a linear layer and another batch normalization
# (MobileNetV2's projection blocks) has a beta gradient of exactly zero in
# exact arithmetic, and two float32 computations of zero agree only in
# being tiny.
TRAINING = False


def three_channels(dataset, size: int):
    """MNIST batches resized to ``size`` x ``size`` and repeated to the
    three channels the applications expect."""

    def convert(images, labels):
        images = tf.image.resize(images, (size, size))
        return tf.image.grayscale_to_rgb(images), labels

    return dataset.map(convert)


def gradients(model, images, labels) -> list:
    """Gradients of the mean training loss for one batch, one per
    trainable weight, by the backend's own automatic differentiation."""
    images, labels = np.asarray(images), np.asarray(labels)
    backend = keras.backend.backend()

    def loss(predictions):
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(labels, predictions)
        )

    if backend == "tensorflow":
        with tf.GradientTape() as tape:
            value = loss(model(images, training=TRAINING))
        grads = tape.gradient(value, model.trainable_weights)
    elif backend == "jax":
        import jax

        frozen = [v.value for v in model.non_trainable_variables]

        def of_weights(trainable):
            predictions, _ = model.stateless_call(
                trainable, frozen, images, training=TRAINING
            )
            return loss(predictions)

        grads = jax.grad(of_weights)([v.value for v in model.trainable_weights])
    else:
        import torch

        value = loss(model(images, training=TRAINING))
        weights = [v.value for v in model.trainable_weights]
        grads = torch.autograd.grad(value, weights)
    return [keras.ops.convert_to_numpy(g) for g in grads]


def print_gradient_table(converted, original, batch) -> float:
    """Prints each weight's first-step gradient agreement; returns the
    largest relative difference."""
    mine = gradients(converted, *batch)
    theirs = gradients(original, *batch)
    print(
        "\nFirst step gradients, converted against original (largest "
        "difference relative to the largest original value):"
    )
    width = max(len(w.path) for w in original.trainable_weights)
    worst = 0.0
    for weight, a, b in zip(original.trainable_weights, mine, theirs):
        error = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
        worst = max(worst, error)
        verdict = "agree" if error <= TOLERANCE else "DIFFER"
        print(f"  {weight.path:<{width}}  {error:8.1e}  {verdict}")
    print(f"largest: {worst:.1e}")
    return worst


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=sorted(APPLICATIONS), default="MobileNetV2"
    )
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=2048, metavar="N")
    parser.add_argument("--test-size", type=int, default=512, metavar="N")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--manual-dir", metavar="DIR")
    parser.add_argument("--data-dir", metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = parse_arguments()

    def load():
        # A fresh pipeline per model, made from the same seed, yields the
        # same batches in the same order.
        train, test = data.load(
            "mnist",
            manual_dir=args.manual_dir,
            data_dir=args.data_dir,
            train_size=args.train_size,
            test_size=args.test_size,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        return three_channels(train, args.size), three_channels(test, args.size)

    data.quiet()
    try:
        first_train, _ = load()
    except data.DataUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    keras.utils.set_random_seed(args.seed)
    original = APPLICATIONS[args.model](
        weights=None, input_shape=(args.size, args.size, 3), classes=10
    )
    converted = keras_rotconv.convert(original)
    report = converted.rotconv_report
    print(f"{args.model}: {len(report.converted)} layers converted")
    for kind in sorted({new for _, _, new in report.converted}):
        count = sum(new == kind for _, _, new in report.converted)
        print(f"  {count:3d} x {kind}")
    print_gradient_table(converted, original, next(iter(first_train)))

    histories = {}
    for name, model in (("converted", converted), ("original", original)):
        train, test = load()
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        print(f"\nTraining the {name} model")
        histories[name] = model.fit(
            train, epochs=args.epochs, validation_data=test, verbose=2
        ).history
    print("\nepoch  loss (converted / original)   val_accuracy")
    for epoch in range(args.epochs):
        mine, theirs = histories["converted"], histories["original"]
        print(
            f"{epoch + 1:5d}  {mine['loss'][epoch]:.4f} / "
            f"{theirs['loss'][epoch]:.4f}      "
            f"{mine['val_accuracy'][epoch]:.4f} / "
            f"{theirs['val_accuracy'][epoch]:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
