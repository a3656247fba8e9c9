"""``keras-rotconv train``: the example model on MNIST or Fashion-MNIST.

Trains with ``model.fit``, evaluates on the test split, saves the model as a
``.keras`` file and writes two figures: the learning curves and the test
set's confusion matrix.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import keras
import numpy as np

from keras_rotconv import data, models, plots


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
    verbose: int | str = "auto",
) -> Outcome:
    """Trains ``models.mnist_model()`` on ``dataset`` and writes, under
    ``output``, ``<dataset>_rotconv.keras``, ``<dataset>_history.png`` and
    ``<dataset>_confusion.png``.

    ``epochs`` defaults to ``models.EPOCHS[dataset]``. ``seed`` fixes the
    initial weights, the dropout masks and the order of the batches.
    """
    data.check_name(dataset)
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
    keras.utils.set_random_seed(seed)
    model = models.compile_model(
        models.mnist_model(), total_steps=epochs * len(train_data)
    )
    history = model.fit(
        train_data,
        epochs=epochs,
        validation_data=test_data,
        shuffle=False,  # the pipeline shuffles, in an order fixed by `seed`
        verbose=verbose,
    ).history
    _, accuracy = model.evaluate(test_data, verbose=0)

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model_path = output / f"{dataset}_rotconv.keras"
    model.save(model_path)
    labels = np.concatenate([y for _, y in test_data.as_numpy_iterator()])
    predictions = np.argmax(model.predict(test_data, verbose=0), axis=-1)
    title = f"RotConv2D CNN on {dataset}"
    files = [
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
    return Outcome(model, history, float(accuracy), files)
