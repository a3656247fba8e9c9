"""Data-parallel training of RotConv2D on the engines that exist:
tf.distribute's MirroredStrategy over two logical CPUs and
MultiWorkerMirroredStrategy over two worker processes on localhost, and
keras.distribution.DataParallel over two JAX host devices. Each trains the
MNIST-like model in processes of its own (``distributed_worker.py``) and
must end with the weights of training on one device with the same global
batches.

Also: ``keras_rotconv.tools.distribute.make_strategy``'s errors, and the train
command's ``--strategy``.
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import mnist_like
import numpy as np
import pytest
from conftest import (
    BACKEND,
    FLOAT32_RTOL,
    assert_close,
    child_environment,
    relative_error,
)

from keras_rotconv import RotConv2D
from keras_rotconv.tools import cli, data, distribute, training

WORKER = Path(__file__).with_name("distributed_worker.py")
# A worker imports TensorFlow (~10 s on a busy 2-core machine) and trains
# for a few seconds; these bounds only stop a hung collective from hanging
# the suite.
TIMEOUT_S = 240

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="tf.distribute strategies run on the TensorFlow backend",
)


def _run_worker(mode, out, **env):
    result = subprocess.run(
        [sys.executable, str(WORKER), mode, str(out)],
        env=child_environment(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


def _weights(results, prefix):
    count = sum(1 for key in results if key.startswith(f"{prefix}/"))
    return [results[f"{prefix}/{i}"] for i in range(count)]


def _assert_trained(trained, initial):
    """Training moved every weight by far more than the tolerance, so that
    agreeing within it says something."""
    for i, (after, before) in enumerate(zip(trained, initial, strict=True)):
        moved = relative_error(after, before)
        assert moved > 10 * FLOAT32_RTOL, f"weight {i} moved by {moved:.1e}"


def _assert_same_weights(mine, theirs, what):
    assert len(mine) == len(theirs) > 0
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert_close(a, b, FLOAT32_RTOL, f"{what}, weight {i}")


@tensorflow_only
def test_mirrored_over_two_cpus_equals_one_device(tmp_path):
    results = _run_worker("mirrored", tmp_path / "mirrored.npz")
    assert results["replicas"] == 2
    one_device = _weights(results, "even/one-device")
    _assert_trained(one_device, mnist_like.initial_weights())
    _assert_same_weights(
        _weights(results, "even/mirrored"), one_device, "mirrored"
    )
    # Keras averages the loss per replica, so a last batch split 1 + 0 is
    # not one device's step; the built-in layer under the same strategy is
    # the oracle there, run with TensorFlow's oneDNN kernels off: with them
    # on, Conv2D's own convolutions return their input for the empty
    # replica's batch and its kernel gradient fails ("Missing 1-th output
    # from Conv2DBackpropFilter"). The empty replica used to fail RotConv2D
    # too (a convolution over zero channels in the kernel gradient; then
    # that oneDNN output), so it runs with the machine's setting.
    ragged = _weights(results, "ragged/mirrored")
    _assert_trained(ragged, mnist_like.initial_weights())
    oracle = _run_worker(
        "mirrored-conv2d",
        tmp_path / "mirrored-conv2d.npz",
        TF_ENABLE_ONEDNN_OPTS="0",
    )
    _assert_same_weights(
        ragged, _weights(oracle, "ragged/mirrored-conv2d"), "ragged batch"
    )


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start_worker(index, workers, directory):
    config = {
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": index},
    }
    out = directory / f"worker{index}.npz"
    with open(directory / f"worker{index}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, str(WORKER), "multiworker", str(out)],
            env=child_environment(TF_CONFIG=json.dumps(config)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@tensorflow_only
def test_multiworker_over_two_processes_equals_one_device(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    try:
        for index in range(2):
            processes.append(_start_worker(index, workers, tmp_path))
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index, process in enumerate(processes):
        output = (tmp_path / f"worker{index}.log").read_text()
        assert process.returncode == 0, output[-3000:]

    first, second = (dict(np.load(tmp_path / f"worker{i}.npz")) for i in (0, 1))
    assert first["replicas"] == second["replicas"] == 2
    assert first["chief"] and not second["chief"]
    for a, b in zip(
        _weights(first, "trained"), _weights(second, "trained"), strict=True
    ):
        assert np.array_equal(a, b), "the workers' weights differ"

    model = mnist_like.compile_for_sgd(mnist_like.model(RotConv2D))
    model.set_weights(_weights(first, "initial"))
    x, y = mnist_like.data(32)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    _assert_trained(model.get_weights(), _weights(first, "initial"))
    _assert_same_weights(
        _weights(first, "trained"), model.get_weights(), "multi-worker"
    )


@pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution runs on the JAX backend"
)
def test_jax_data_parallel_over_two_devices_equals_one_device(tmp_path):
    results = _run_worker(
        "data-parallel",
        tmp_path / "data_parallel.npz",
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert results["devices"] == 2
    one_device = _weights(results, "one-device")
    _assert_trained(one_device, mnist_like.initial_weights())
    _assert_same_weights(
        _weights(results, "data-parallel"), one_device, "DataParallel"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ring", "Received: strategy='ring'"),
        ("Mirrored", "Received: strategy='Mirrored'"),
    ],
)
def test_unknown_strategy_names_the_value(name, message):
    with pytest.raises(ValueError, match=message):
        distribute.make_strategy(name)


def test_no_strategy_is_none():
    assert distribute.make_strategy(None) is None
    assert distribute.make_strategy("none") is None


@pytest.mark.skipif(
    BACKEND == "tensorflow", reason="tests the error other backends give"
)
def test_strategies_need_the_tensorflow_backend():
    with pytest.raises(ValueError, match=f"backend='{BACKEND}'"):
        distribute.make_strategy("mirrored")


BAD_TF_CONFIGS = {
    "unset": None,
    "not-json": "workers: a, b",
    "no-cluster": '{"task": {"type": "worker", "index": 0}}',
    "no-port": '{"cluster": {"worker": ["hostA"]}, '
    '"task": {"type": "worker", "index": 0}}',
    "index-out-of-range": '{"cluster": {"worker": ["a:1", "b:1"]}, '
    '"task": {"type": "worker", "index": 2}}',
    "unknown-task-type": '{"cluster": {"worker": ["a:1"]}, '
    '"task": {"type": "ps", "index": 0}}',
}


@pytest.mark.parametrize("name", sorted(BAD_TF_CONFIGS))
def test_bad_tf_config_says_what_is_wrong(name):
    value = BAD_TF_CONFIGS[name]
    with pytest.raises(ValueError, match="TF_CONFIG") as raised:
        distribute.check_tf_config(value)
    assert f"Received: TF_CONFIG={value!r}" in str(raised.value)


def test_good_tf_config_parses():
    value = json.dumps(
        {
            "cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
            "task": {"type": "worker", "index": 1},
        }
    )
    assert distribute.check_tf_config(value)["task"]["index"] == 1


@tensorflow_only
def test_devices_only_for_mirrored():
    with pytest.raises(ValueError, match="devices"):
        distribute.make_strategy("multiworker", devices=["/cpu:0"])


@tensorflow_only
def test_one_process_is_its_own_chief():
    assert distribute.is_chief(None)
    assert distribute.is_chief(distribute.make_strategy("mirrored"))
    assert keras.backend.backend() == "tensorflow"


def test_train_command_rejects_an_unknown_strategy(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--strategy", "ring"])
    assert exit_info.value.code == 2
    assert "--strategy" in capsys.readouterr().err


@pytest.mark.parametrize("name", [None, *distribute.STRATEGIES])
def test_train_command_passes_the_strategy_on(monkeypatch, capsys, name):
    received = {}

    def train(dataset, **kwargs):
        received.update(kwargs)
        return training.Outcome(None, {}, 0.5, [])

    monkeypatch.setattr(training, "train", train)
    argv = ["train"] + ([] if name is None else ["--strategy", name])
    assert cli.main(argv) == 0
    assert received["strategy"] == name
    assert capsys.readouterr().out.endswith("test accuracy: 0.5000\n")


@tensorflow_only
def test_train_command_without_tf_config_fails_before_loading_data(
    monkeypatch, capsys
):
    monkeypatch.delenv("TF_CONFIG", raising=False)

    def load(*args, **kwargs):
        raise AssertionError("data loaded before the strategy was checked")

    monkeypatch.setattr(data, "load", load)
    assert cli.main(["train", "--strategy", "multiworker"]) == 1
    error = capsys.readouterr().err
    assert "TF_CONFIG" in error and "Received: TF_CONFIG=None" in error
