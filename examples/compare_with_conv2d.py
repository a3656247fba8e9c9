"""Train twin models, RotConv2D and keras.layers.Conv2D, side by side.

The two models have the same architecture, start from the same weights, draw
the same dropout masks and see the same batches in the same order. The only
difference is how the convolutions' gradients are computed: by the derived
rules (RotConv2D) or by the backend's own convolution gradient
(Conv2D). The script prints

1. how closely the gradients of every weight agree at the first step, and
2. both learning curves, epoch by epoch, and their largest difference,

and saves a figure with the two sets of curves overlaid.

    python examples/compare_with_conv2d.py --epochs 3
    python examples/compare_with_conv2d.py --manual-dir /path/to/mnist
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np

from keras_rotconv import RotConv2D
from keras_rotconv.tools import data, models, plots, verify

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def twins(seed: int) -> dict[str, keras.Model]:
    """The example CNN twice, with identical weights and dropout seeds."""
    built = {}
    for conv in (RotConv2D, keras.layers.Conv2D):
        # Resetting the seed before each model gives both the same initial
        # weights and the same dropout seed generators.
        keras.utils.set_random_seed(seed)
        built[conv.__name__] = models.mnist_model(conv)
    rot, builtin = built.values()
    for a, b in zip(rot.get_weights(), builtin.get_weights()):
        if not np.array_equal(a, b):
            raise AssertionError("the twins start from different weights")
    return built


def first_step_gradients(model: keras.Model, images, labels) -> list:
    """Gradient of the training loss for one batch, one per trainable
    weight, by the backend's own automatic differentiation (which calls the
    derived rules for RotConv2D and the built-in ones for Conv2D)."""
    images = keras.ops.convert_to_tensor(np.asarray(images))
    labels = keras.ops.convert_to_tensor(np.asarray(labels))
    backend = keras.backend.backend()
    return _GRADIENTS[backend](model, images, labels)


def _loss(model, images, labels, trainable=None):
    """The mean training loss, computed with ``trainable`` (a list of values)
    in place of the model's trainable weights when given."""
    if trainable is None:
        predictions = model(images, training=False)
    else:
        frozen = [v.value for v in model.non_trainable_variables]
        predictions, _ = model.stateless_call(
            trainable, frozen, images, training=False
        )
    return keras.ops.mean(
        keras.losses.sparse_categorical_crossentropy(labels, predictions)
    )


def _tf_gradients(model, images, labels):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = _loss(model, images, labels)
    return tape.gradient(loss, model.trainable_weights)


def _jax_gradients(model, images, labels):
    import jax

    trainable = [v.value for v in model.trainable_weights]
    return jax.grad(lambda t: _loss(model, images, labels, t))(trainable)


def _torch_gradients(model, images, labels):
    import torch

    loss = _loss(model, images, labels)
    weights = [v.value for v in model.trainable_weights]
    return [g.detach().cpu() for g in torch.autograd.grad(loss, weights)]


_GRADIENTS = {
    "tensorflow": _tf_gradients,
    "jax": _jax_gradients,
    "torch": _torch_gradients,
}


def print_gradient_agreement(rot, builtin, batch) -> None:
    images, labels = batch
    rot_grads = first_step_gradients(rot, images, labels)
    builtin_grads = first_step_gradients(builtin, images, labels)
    print(
        "Gradients at the first step, RotConv2D twin against Conv2D twin "
        "(largest difference relative to the largest Conv2D value):"
    )
    width = max(len(w.path) for w in builtin.trainable_weights)
    for weight, g_rot, g_ref in zip(
        builtin.trainable_weights, rot_grads, builtin_grads
    ):
        g_rot = keras.ops.convert_to_numpy(g_rot)
        g_ref = keras.ops.convert_to_numpy(g_ref)
        error = np.max(np.abs(g_rot - g_ref)) / np.max(np.abs(g_ref))
        verdict = "agree" if error <= verify.TOLERANCE["float32"] else "DIFFER"
        print(f"  {weight.path:<{width}}  {error:8.1e}  {verdict}")


def print_curves(histories: dict[str, dict[str, list[float]]]) -> None:
    names = list(histories)
    print(f"\nLearning curves ({' / '.join(names)}):")
    print("epoch  " + "".join(f"{metric:<19}" for metric in METRICS))
    for epoch in range(len(histories[names[0]]["loss"])):
        cells = [
            " / ".join(f"{histories[n][metric][epoch]:.4f}" for n in names)
            for metric in METRICS
        ]
        print(f"{epoch + 1:5d}  " + "".join(f"{c:<19}" for c in cells))
    for metric in METRICS:
        a, b = (np.asarray(histories[n][metric]) for n in names)
        print(
            f"largest difference in {metric} over the epochs: "
            f"{np.max(np.abs(a - b)):.4f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=data.DATASETS, default="mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--manual-dir", metavar="DIR")
    parser.add_argument("--data-dir", metavar="DIR")
    parser.add_argument("--train-size", type=int, metavar="N")
    parser.add_argument("--test-size", type=int, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="compare_with_conv2d.png")
    args = parser.parse_args()

    def load():
        # A fresh pipeline per model, made from the same seed, yields the
        # same batches in the same order in every epoch.
        return data.load(
            args.dataset,
            manual_dir=args.manual_dir,
            data_dir=args.data_dir,
            train_size=args.train_size,
            test_size=args.test_size,
            seed=args.seed,
        )

    data.quiet()
    try:
        first_train, _ = load()
    except data.DataUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    twin_models = twins(args.seed)
    print_gradient_agreement(*twin_models.values(), next(iter(first_train)))

    histories = {}
    for name, model in twin_models.items():
        train, test = load()
        models.compile_model(model, total_steps=args.epochs * len(train))
        print(f"\nTraining the {name} twin")
        histories[name] = model.fit(
            train,
            epochs=args.epochs,
            validation_data=test,
            shuffle=False,  # the pipeline shuffles, the same for both twins
            verbose=2,
        ).history

    print_curves(histories)
    path = plots.comparison_figure(
        histories,
        args.output,
        f"{args.dataset}: RotConv2D and Conv2D twins, same weights and batches",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
