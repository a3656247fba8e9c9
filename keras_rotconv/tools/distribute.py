"""Training on several devices or machines with ``tf.distribute``.

``make_strategy`` turns the name given on the command line into a
``tf.distribute`` strategy. Build and compile the model under its
``scope()``; then

* ``"mirrored"`` (one machine, several devices) trains with ``model.fit``;
* ``"multiworker"`` (several machines, or processes, each described by the
  ``TF_CONFIG`` environment variable) trains with ``fit`` below, since
  Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy``
  (keras-team/keras#20585: it reduces the first input batch and then every
  step's scalar logs across workers with calls that strategy rejects).

RotConv layers need nothing of their own here: their gradients are
computed per replica like any layer's, and the strategy sums them.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:
    import tensorflow as tf

STRATEGIES = ("mirrored", "multiworker")


class StrategyError(ValueError):
    """A strategy that cannot be made: its name, the backend or TF_CONFIG
    is wrong. The message says which, and what was received."""


def make_strategy(
    name: str | None, devices: list[str] | None = None
) -> tf.distribute.Strategy | None:
    """The strategy called ``name``, or None for Keras's default (one
    device) when ``name`` is None or ``"none"``.

    Args:
        name: ``"mirrored"``: ``tf.distribute.MirroredStrategy`` over
            ``devices`` (default: every GPU, else the CPU);
            ``"multiworker"``: ``tf.distribute.MultiWorkerMirroredStrategy``
            over the cluster that ``TF_CONFIG`` describes, which must be
            set, in every worker process.
        devices: For ``"mirrored"`` only, the devices to mirror over.

    Raises:
        StrategyError: for an unknown name, a backend other than TensorFlow,
            devices given to another strategy than ``"mirrored"``, or a
            missing or malformed ``TF_CONFIG`` for ``"multiworker"``.
    """
    if name is None or name == "none":
        return None
    if name not in STRATEGIES:
        raise StrategyError(
            f"Unknown strategy. Expected one of {STRATEGIES} or None. "
            f"Received: strategy={name!r}"
        )
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise StrategyError(
            f"strategy={name!r} is a tf.distribute strategy and needs the "
            "TensorFlow backend (KERAS_BACKEND=tensorflow); on JAX, use "
            "keras.distribution.DataParallel instead. Received: "
            f"backend={backend!r}"
        )
    if devices is not None and name != "mirrored":
        raise StrategyError(
            "Only the 'mirrored' strategy takes devices; the cluster decides "
            f"for the others. Received: strategy={name!r}, devices={devices}"
        )
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    check_tf_config(os.environ.get("TF_CONFIG"))
    return tf.distribute.MultiWorkerMirroredStrategy()


def check_tf_config(value: str | None) -> dict:
    """``TF_CONFIG`` parsed, or a StrategyError that says what is wrong.

    A worker needs ``{"cluster": {"worker": ["host:port", ...]}, "task":
    {"type": "worker", "index": i}}``, the same cluster in every worker and
    its own index in each.
    """
    example = (
        '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    if not value:
        raise StrategyError(
            "strategy='multiworker' needs the TF_CONFIG environment variable, "
            f"set in each worker to the cluster and its own task, e.g. "
            f"TF_CONFIG='{example}'. Received: TF_CONFIG={value!r}"
        )
    try:
        config = json.loads(value)
        workers = config["cluster"]["worker"]
        task = config["task"]
        kind, index = task["type"], task["index"]
    except (ValueError, TypeError, KeyError) as error:
        raise StrategyError(
            f"TF_CONFIG must be JSON like '{example}' ({error!r}). "
            f"Received: TF_CONFIG={value!r}"
        ) from None
    valid = (
        isinstance(workers, list)
        and workers
        and all(isinstance(w, str) and ":" in w for w in workers)
        and kind in ("worker", "chief")
        and isinstance(index, int)
        and 0 <= index < len(config["cluster"].get(kind, []))
    )
    if not valid:
        raise StrategyError(
            "TF_CONFIG must list the workers as 'host:port' strings and give "
            "this process's task as a type ('worker' or 'chief') and an index "
            f"into that list. Received: TF_CONFIG={value!r}"
        )
    return config


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process should write files (the model, logs): the one
    chief of a multi-worker cluster, or any process of another strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and (not has_chief)
    )


def scope(strategy: tf.distribute.Strategy | None):
    """``strategy.scope()``, or a scope that does nothing for None."""
    return (
        strategy.scope() if strategy is not None else contextlib.nullcontext()
    )


def fit(
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    epochs: int,
    strategy: tf.distribute.Strategy,
    validation_data: tf.data.Dataset | None = None,
) -> dict[str, list[float]]:
    """``model.fit(dataset, epochs=epochs, validation_data=...)`` for a
    strategy that ``model.fit`` cannot drive: each step runs the model's own
    ``train_step`` (``test_step`` for validation) on every replica under
    ``strategy.run``.

    ``model`` must have been built and compiled under ``strategy.scope()``,
    and the datasets must yield ``(x, y)`` batches of the global batch size:
    the strategy splits each one across the replicas of all workers, which
    must all call this. Returns each metric's mean over the replicas at the
    end of each epoch, named as ``History.history`` names them.
    """
    import tensorflow as tf

    if not model.optimizer.built:
        # Built here, not lazily inside the first replica step, where
        # variables cannot be created.
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

    def distributed(step_function):
        @tf.function
        def step(batch):
            logs = strategy.run(step_function, args=(batch,))
            return {
                name: strategy.reduce("MEAN", value, axis=None)
                for name, value in logs.items()
            }

        return step

    def run_epoch(step, batches, prefix=""):
        model.reset_metrics()
        logs = {}
        for batch in batches:
            logs = step(batch)
        for name, value in logs.items():
            history.setdefault(prefix + name, []).append(float(value))

    train_step = distributed(model.train_step)
    train_batches = strategy.experimental_distribute_dataset(dataset)
    if validation_data is not None:
        test_step = distributed(model.test_step)
        test_batches = strategy.experimental_distribute_dataset(validation_data)
    history: dict[str, list[float]] = {}
    for _ in range(epochs):
        run_epoch(train_step, train_batches)
        if validation_data is not None:
            run_epoch(test_step, test_batches, prefix="val_")
    return history
