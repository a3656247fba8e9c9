"""``keras-rotconv train``: the example model on MNIST or Fashion-MNIST.

Trains with ``model.fit``, evaluates on the test split, saves the model as a
``.keras`` file and writes two figures: the learning curves and the test
set's confusion matrix. With a ``tf.distribute`` strategy (see
``keras_rotconv.tools.distribute``) it trains data-parallel: ``"mirrored"`` over
this machine's devices, ``"multiworker"`` over the machines that
``TF_CONFIG`` lists, each running the same command.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import keras
import numpy as np

from keras_rotconv.tools import data, distribute, models, plots


@dataclasses.dataclass
class Outcome:
    """What a training run produced."""

    model: keras.Model
    history: dict[str, list[float]]
    test_accuracy: float
    files: list[Path]


def train(
    dataset: str = "mnist",
    *,
    epochs: int | None = None,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    output: str | os.PathLike = "rotconv-output",
    train_size: int | None = None,
    test_size: int | None = None,
    batch_size: int = models.BATCH_SIZE,
    seed: int = 0,
    strategy: str | None = None,
    verbose: int | str = "auto",
) -> Outcome:
    """Trains ``models.mnist_model()`` on ``dataset`` and writes, under
    ``output``, ``<dataset>_rotconv.keras``, ``<dataset>_history.png`` and
    ``<dataset>_confusion.png``.

    ``epochs`` defaults to ``models.EPOCHS[dataset]``. ``seed`` fixes the
    initial weights, the dropout masks and the order of the batches.
    ``strategy`` is one of ``distribute.STRATEGIES`` or None; under
    ``"multiworker"`` every worker trains and evaluates, and only the chief
    writes files (the others return none). ``batch_size`` is the global
    batch, split across all replicas.
    """
    data.check_name(dataset)
    # First: a multi-worker strategy must set up the cluster before
    # TensorFlow runs anything.
    tf_strategy = distribute.make_strategy(strategy)
    multiworker = strategy == "multiworker"
    if epochs is None:
        epochs = models.EPOCHS[dataset]
    if epochs < 1:
        raise ValueError(
            f"`epochs` must be a positive integer. Received: epochs={epochs}"
        )
    train_data, test_data = data.load(
        dataset,
        manual_dir=manual_dir,
        data_dir=data_dir,
        train_size=train_size,
        test_size=test_size,
        batch_size=batch_size,
        seed=seed,
    )
    if multiworker:
        train_data, test_data = _by_element(train_data), _by_element(test_data)
    keras.utils.set_random_seed(seed)
    with distribute.scope(tf_strategy):
        model = models.compile_model(
            models.mnist_model(), total_steps=epochs * len(train_data)
        )
    history = _fit(
        model, train_data, test_data, epochs, tf_strategy, verbose, multiworker
    )
    # model.evaluate and model.predict fail under a multi-worker strategy
    # too; a copy of the trained weights outside it evaluates locally.
    evaluated = _local_copy(model) if multiworker else model
    _, accuracy = evaluated.evaluate(test_data, verbose=0)
    files = []
    if distribute.is_chief(tf_strategy):
        files = _write(model, evaluated, history, test_data, dataset, output)
    return Outcome(model, history, float(accuracy), files)


def _fit(model, train_data, test_data, epochs, tf_strategy, verbose, workers):
    """The training history: ``model.fit``, or over several workers
    (a multi-worker strategy, which ``fit`` cannot drive) ``distribute.fit``.
    """
    if workers:
        return distribute.fit(
            model,
            train_data,
            epochs=epochs,
            strategy=tf_strategy,
            validation_data=test_data,
        )
    return model.fit(
        train_data,
        epochs=epochs,
        validation_data=test_data,
        shuffle=False,  # the pipeline shuffles, in order fixed by `seed`
        verbose=verbose,
    ).history


def _write(model, evaluated, history, test_data, dataset, output):
    """Saves the model and its two figures under ``output``; their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model_path = output / f"{dataset}_rotconv.keras"
    model.save(model_path)
    labels = np.concatenate([y for _, y in test_data.as_numpy_iterator()])
    predictions = np.argmax(evaluated.predict(test_data, verbose=0), axis=-1)
    title = f"RotConv2D CNN on {dataset}"
    return [
        model_path,
        plots.history_figure(history, output / f"{dataset}_history.png", title),
        plots.confusion_figure(
            labels,
            predictions,
            models.CLASS_NAMES[dataset],
            output / f"{dataset}_confusion.png",
            f"{title}: test set",
        ),
    ]


def _by_element(dataset):
    """Each worker keeps its own part of every batch. Sharing out files
    instead cannot work: each split is one file. Every worker shuffles in
    the same order (the same seed), so the parts make up the batch."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def _local_copy(model: keras.Model) -> keras.Model:
    """The example model with ``model``'s weights, outside any strategy."""
    copy = models.compile_model(models.mnist_model(), total_steps=1)
    copy.set_weights(model.get_weights())
    return copy
