"""The processes that test_distributed.py starts: each trains the MNIST-like
model one way and saves the weights for the test to compare.

    python tests/distributed_worker.py mirrored OUT.npz
    python tests/distributed_worker.py mirrored-conv2d OUT.npz
    python tests/distributed_worker.py multiworker OUT.npz   # TF_CONFIG set
    python tests/distributed_worker.py data-parallel OUT.npz # KERAS_BACKEND=jax

Each needs a process of its own: logical devices, the cluster of a
``MultiWorkerMirroredStrategy`` and JAX's host device count are fixed before
the framework first runs anything.
"""

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mnist_like
import numpy as np

GLOBAL_BATCH = 16
EPOCHS = 2


def _train(conv, strategy, weights, x, y, epochs=EPOCHS):
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        model = mnist_like.compile_for_sgd(mnist_like.model(conv))
        model.set_weights(weights)
    model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0
    )
    return model.get_weights()


def mirrored(builtin=False):
    """One device against two mirrored logical CPUs, with the same global
    batches; and, with a last batch of one sample (one replica gets none),
    the model under the same strategy. ``builtin``: only that last run,
    with Conv2D (the test's oracle, run in a process of its own)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    from keras_rotconv import RotConv2D
    from keras_rotconv.tools import distribute

    strategy = distribute.make_strategy(
        "mirrored", devices=["/cpu:0", "/cpu:1"]
    )
    weights = mnist_like.initial_weights()
    x, y = mnist_like.data(2 * GLOBAL_BATCH)
    ragged_x, ragged_y = mnist_like.data(2 * GLOBAL_BATCH + 1)
    # One epoch is enough to reach the last, ragged batch.
    if builtin:
        runs = {
            "ragged/mirrored-conv2d": (
                keras.layers.Conv2D,
                strategy,
                ragged_x,
                ragged_y,
                1,
            )
        }
    else:
        runs = {
            "even/one-device": (RotConv2D, None, x, y, EPOCHS),
            "even/mirrored": (RotConv2D, strategy, x, y, EPOCHS),
            "ragged/mirrored": (RotConv2D, strategy, ragged_x, ragged_y, 1),
        }
    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    for name, (conv, run_strategy, images, labels, epochs) in runs.items():
        trained = _train(conv, run_strategy, weights, images, labels, epochs)
        results.update({f"{name}/{i}": w for i, w in enumerate(trained)})
    return results


def multiworker():
    """One worker of a cluster that TF_CONFIG describes, training with
    ``distribute.fit`` on the global batches."""
    from keras_rotconv import RotConv2D
    from keras_rotconv.tools import distribute

    # Created first: the strategy sets up the cluster before TensorFlow
    # runs anything else.
    strategy = distribute.make_strategy("multiworker")
    import tensorflow as tf

    weights = mnist_like.initial_weights()
    x, y = mnist_like.data(2 * GLOBAL_BATCH)
    with strategy.scope():
        model = mnist_like.compile_for_sgd(mnist_like.model(RotConv2D))
        model.set_weights(weights)
    options = tf.data.Options()
    # In-memory data has no files to split between workers: each worker
    # takes its share of every global batch.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(GLOBAL_BATCH)
        .with_options(options)
    )
    history = distribute.fit(model, dataset, epochs=EPOCHS, strategy=strategy)
    results = {
        "replicas": np.array(strategy.num_replicas_in_sync),
        "chief": np.array(distribute.is_chief(strategy)),
        "loss": np.array(history["loss"]),
    }
    results.update({f"initial/{i}": w for i, w in enumerate(weights)})
    results.update(
        {f"trained/{i}": w for i, w in enumerate(model.get_weights())}
    )
    return results


def data_parallel():
    """On JAX: one device against ``keras.distribution.DataParallel`` over
    every host device, with the same global batches."""
    import jax
    import keras

    from keras_rotconv import RotConv2D

    weights = mnist_like.initial_weights()
    x, y = mnist_like.data(2 * GLOBAL_BATCH)
    results = {"devices": np.array(len(jax.devices()))}
    one = _train(RotConv2D, None, weights, x, y)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices())
    )
    parallel = _train(RotConv2D, None, weights, x, y)
    results.update({f"one-device/{i}": w for i, w in enumerate(one)})
    results.update({f"data-parallel/{i}": w for i, w in enumerate(parallel)})
    return results


MODES = {
    "mirrored": mirrored,
    "mirrored-conv2d": lambda: mirrored(builtin=True),
    "multiworker": multiworker,
    "data-parallel": data_parallel,
}

if __name__ == "__main__":
    mode, out = sys.argv[1:]
    np.savez(out, **MODES[mode]())
