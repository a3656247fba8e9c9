"""Train-step time and memory of RotConv layers against the built-in ones.

Every case builds the same model twice, once with the keras_rotconv layers
and once with their built-in Keras twins, gives both the same weights and the
same batch, and compiles both with the same optimizer and loss, once for
each ``jit_compile`` setting a user of the backend can pick (TensorFlow:
False and True; JAX: True; torch: False, and True, ``torch.compile``, with
``--torch-compile``). Then:

* time: two train steps run interleaved, in blocks of a few steps each
  (the order alternating from block to block), so that a change in the load
  of the machine hits both alike. A block's ratio is RotConv's time per step
  over the built-in layer's; the reported ratio is the median over the
  blocks. Each RotConv setting is timed twice so: against the built-in
  layer with the same setting (``time_ratio``), and against the built-in
  layer with the setting where it ran fastest (``against_fastest``: what a
  user choosing freely would compare with; the same pair when the settings
  agree).
* the first step: the seconds each model's first train step took, which
  traces and compiles it (``first_step_s``). With ``torch.compile`` each
  case's models are compiled as if each were alone in its process (see
  ``compiles_alone``), but they share the process: the first model
  compiled (RotConv's) also pays the compiler's cold start, and later
  ones find its files in the compile cache. ``compile_time.py`` times each
  model in a fresh process of its own.
* memory (TensorFlow; torch on CUDA, below): the peak number of bytes
  TensorFlow's CPU allocator holds during one train step, above what it
  held just before the step (the weights, the optimizer state and the
  batch, which are the same for both twins). The allocator only keeps these
  statistics in its BFC variant, so this runs in a separate process started
  with ``TF_CPU_ALLOCATOR_USE_BFC=true``; XLA's buffers come from the same
  allocator, so the compiled cases are counted as well. It runs after the
  timing, and the kernel-gradient forms the timing process chose by timing
  (``keras_rotconv._tuning``) are handed to it, so that the memory is that
  of the forms timed; each result lists them (``kernel_gradient_forms``).
  On torch with a CUDA device: the peak bytes torch's CUDA allocator hands
  out during one train step above what it held before it
  (``torch.cuda.max_memory_allocated``), in the timing process.

Results go to ``<out>/benchmark_<backend>[_quick].json`` and a bar chart next
to it. Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/benchmark.py            # the full run
    PYTHONPATH=$PWD python benchmarks/benchmark.py --quick    # tiny, for CI
    PYTHONPATH=$PWD python benchmarks/benchmark.py --cases 26x26 13x13

The report also records the CPU, its ISA flags and TensorFlow's oneDNN
setting (``TF_ENABLE_ONEDNN_OPTS``, or TensorFlow's default for the CPU),
which change the built-in layers' CPU convolutions.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import keras_rotconv
from keras_rotconv import _tuning
from keras_rotconv.tools import models as package_models

BUILTIN = {1: "Conv1D", 2: "Conv2D", 3: "Conv3D"}
ROTCONV = {1: "RotConv1D", 2: "RotConv2D", 3: "RotConv3D"}

# What the ratios in a report mean, written into it.
RATIOS = {
    "time_ratio": "RotConv's step time over the built-in layer's, both "
    "with the result's jit_compile: the median of interleaved blocks' ratios",
    "against_fastest": "the same for RotConv with the result's jit_compile "
    "against the built-in layer with builtin_jit_compile, the setting of "
    "those timed where its median step was shortest (builtin_ms_by_mode); "
    "the same-mode pair itself when builtin_jit_compile is jit_compile",
}


def sgd() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(1e-4)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: a model built from a conv layer class.

    ``build(conv, quick)`` returns ``(model, loss, x_shape, y_shape)``, with
    ``conv`` the layer class of rank ``rank`` to use. ``optimizer()`` makes
    a fresh optimizer for each model; ``metrics`` go to ``compile``.
    """

    name: str
    rank: int
    build: Callable
    optimizer: Callable[[], keras.optimizers.Optimizer] = sgd
    metrics: tuple[str, ...] = ()


class Scale(keras.layers.Layer):
    """A trainable per-channel factor in front of a conv layer, so that the
    conv's input needs a gradient, as it does for every layer but the first.
    """

    def build(self, input_shape):
        self.factor = self.add_weight(
            shape=(input_shape[-1],), initializer="ones", name="factor"
        )

    def call(self, inputs):
        return inputs * self.factor


def layer_case(
    name: str,
    rank: int,
    size: int,
    channels: int,
    batch: int,
    *,
    first: bool = False,
    depthwise: bool = False,
    **conv_kwargs,
) -> Case:
    """A single conv layer under a mean-squared-error loss.

    The layer sees ``batch`` inputs of ``size`` per spatial axis with
    ``channels`` channels; ``first=True`` makes it the model's first layer
    (its input needs no gradient), otherwise a ``Scale`` precedes it.
    ``depthwise=True`` sets ``groups`` to the number of channels.
    ``conv_kwargs`` go to the layer (``filters`` defaults to ``channels``,
    ``padding`` to ``"same"``).
    """

    def build(conv, quick):
        kwargs = {"filters": channels, "padding": "same", **conv_kwargs}
        s, c, n = size, channels, batch
        if quick:
            s, c, n = min(s, 8), min(c, 8), 2
            kwargs["filters"] = min(kwargs["filters"], 8)
        if depthwise:
            kwargs["groups"] = c
        inputs = keras.Input((*(s,) * rank, c))
        x = inputs if first else Scale()(inputs)
        outputs = conv(**kwargs)(x)
        model = keras.Model(inputs, outputs)
        return model, "mse", (n, *inputs.shape[1:]), (n, *outputs.shape[1:])

    return Case(name, rank, build)


def mnist_cnn(conv, quick):
    """The Keras "simple MNIST convnet" example, without its dropout (so
    that both twins compute exactly the same step)."""
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            conv(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            conv(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    batch = 4 if quick else 128
    return model, "sparse_categorical_crossentropy", (batch, 28, 28, 1), None


def package_mnist(conv, quick):
    """The package's own example CNN (``keras_rotconv.tools.models``, what
    ``keras-rotconv train`` trains), at its training batch size."""
    batch = 4 if quick else package_models.BATCH_SIZE
    model = package_models.mnist_model(conv)
    return model, "sparse_categorical_crossentropy", (batch, 28, 28, 1), None


def package_optimizer() -> keras.optimizers.Optimizer:
    """Adam on a cosine decay, as ``models.compile_model`` makes it (the
    decay's length changes no step's cost)."""
    schedule = keras.optimizers.schedules.CosineDecay(
        package_models.LEARNING_RATE, decay_steps=10_000
    )
    return keras.optimizers.Adam(schedule)


CASES = [
    Case("MNIST CNN, batch 128", 2, mnist_cnn),
    Case(
        "package MNIST model, Adam, batch 128",
        2,
        package_mnist,
        optimizer=package_optimizer,
        metrics=("accuracy",),
    ),
    # The shapes of the MNIST models' 32->64 layers ("valid", as there).
    layer_case(
        "3x3 32->64 valid, 26x26, batch 128",
        2,
        26,
        32,
        128,
        kernel_size=3,
        filters=64,
        padding="valid",
    ),
    layer_case(
        "3x3 32->64 valid, 13x13, batch 128",
        2,
        13,
        32,
        128,
        kernel_size=3,
        filters=64,
        padding="valid",
    ),
    layer_case("3x3 64->64, 32x32, batch 16", 2, 32, 64, 16, kernel_size=3),
    layer_case("3x3 stride 2", 2, 32, 64, 16, kernel_size=3, strides=2),
    layer_case("3x3 dilation 2", 2, 32, 64, 16, kernel_size=3, dilation_rate=2),
    layer_case("3x3 groups 4", 2, 32, 64, 16, kernel_size=3, groups=4),
    layer_case("3x3 depthwise", 2, 32, 64, 16, kernel_size=3, depthwise=True),
    layer_case("1x1", 2, 32, 64, 16, kernel_size=1),
    layer_case(
        "7x7 stride-2 stem, 3->64, 64x64",
        2,
        64,
        3,
        16,
        first=True,
        kernel_size=7,
        strides=2,
        filters=64,
    ),
    layer_case("1D k3 64->64, length 1024", 1, 1024, 64, 16, kernel_size=3),
    layer_case("3D 3x3x3 16->16, 16^3", 3, 16, 16, 4, kernel_size=3),
]


def build_model(case: Case, quick: bool, kind: str, jit_compile, seed=0):
    """The case's model with the RotConv layer (``kind="rotconv"``) or the
    built-in one (``"builtin"``), compiled; and its ``(x_shape, y_shape)``.
    """
    module, names = {
        "rotconv": (keras_rotconv, ROTCONV),
        "builtin": (keras.layers, BUILTIN),
    }[kind]
    keras.utils.set_random_seed(seed)
    model, loss, x_shape, y_shape = case.build(
        getattr(module, names[case.rank]), quick
    )
    model.compile(
        optimizer=case.optimizer(),
        loss=loss,
        metrics=list(case.metrics),
        jit_compile=jit_compile,
    )
    return model, (x_shape, y_shape)


def one_batch(shapes, seed=0):
    """A batch ``(x, y)`` of the given shapes; ``y`` holds class labels
    when its shape is None."""
    x_shape, y_shape = shapes
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype("float32")
    if y_shape is None:
        y = rng.integers(0, 10, x_shape[0])
    else:
        y = rng.standard_normal(y_shape).astype("float32")
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


def case_models(case: Case, quick: bool, jit_modes):
    """``{(kind, jit_compile): model}`` for both kinds and every mode, all
    with the first RotConv model's weights, and one batch for all."""
    built = {
        (kind, mode): build_model(case, quick, kind, mode)
        for kind in ("rotconv", "builtin")
        for mode in jit_modes
    }
    weights = built["rotconv", jit_modes[0]][0].get_weights()
    for model, _ in built.values():
        model.set_weights(weights)
    shapes = next(iter(built.values()))[1]
    return {key: model for key, (model, _) in built.items()}, one_batch(shapes)


def twins(case: Case, quick: bool, jit_compile: bool):
    """The RotConv model and its built-in twin, both compiled with
    ``jit_compile``, with equal weights, and one batch ``(x, y)`` for both.
    """
    found, batch = case_models(case, quick, [jit_compile])
    return found["rotconv", jit_compile], found["builtin", jit_compile], batch


def time_steps(model, batch, steps: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per train step over ``steps``
    consecutive steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        model.train_on_batch(*batch)
    return (
        (time.perf_counter() - wall) / steps,
        (time.process_time() - cpu) / steps,
    )


def time_pair(rot, builtin, batch, blocks, block_seconds) -> dict:
    """Interleaved blocks of train steps of two warmed-up models; see the
    module docstring."""
    per_step = max(time_steps(m, batch, 1)[0] for m in (rot, builtin))
    steps = max(1, round(block_seconds / per_step))
    wall = {"rotconv": [], "builtin": []}
    cpu = {"rotconv": [], "builtin": []}
    for block in range(blocks):
        order = [("rotconv", rot), ("builtin", builtin)]
        if block % 2:
            order.reverse()
        for name, model in order:
            seconds, cpu_seconds = time_steps(model, batch, steps)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    def block_ratios(times):
        return [r / b for r, b in zip(times["rotconv"], times["builtin"])]

    return {
        "steps_per_block": steps,
        "rotconv_ms": 1e3 * statistics.median(wall["rotconv"]),
        "builtin_ms": 1e3 * statistics.median(wall["builtin"]),
        "time_ratio": statistics.median(block_ratios(wall)),
        "block_ratios": block_ratios(wall),
        # CPU time summed over the process's threads: less disturbed by
        # other work on the machine than the wall clock, but it also counts
        # the thread pools' spinning.
        "cpu_ratio": statistics.median(block_ratios(cpu)),
    }


def new_choices(before: dict) -> list[str]:
    """The kernel-gradient forms the timed choice (``keras_rotconv._tuning``)
    made since ``before``, one per shape, in the order met."""
    return [name for key, name in _tuning.chosen().items() if key not in before]


def time_case(
    case, quick, jit_modes, blocks, block_seconds, cuda_memory
) -> list[dict]:
    """One result per RotConv ``jit_compile`` mode: its ratio to the
    built-in layer in the same mode, and ``against_fastest``, its ratio to
    the built-in layer in the mode where that ran fastest (the lowest
    median step time of the same-mode pairs), timed as its own interleaved
    pair unless it is the same pair. With ``cuda_memory``, each pair's peak
    CUDA memory too (``cuda_step_memory``)."""
    compiles_alone(jit_modes)
    found, batch = case_models(case, quick, jit_modes)
    before = _tuning.chosen()
    # Warm up: trace and compile (the first step, timed), then let caches
    # settle.
    first_step = {
        key: time_steps(model, batch, 1)[0] for key, model in found.items()
    }
    for model in found.values():
        time_steps(model, batch, 1)
    forms = new_choices(before)
    same = {
        mode: time_pair(
            found["rotconv", mode],
            found["builtin", mode],
            batch,
            blocks,
            block_seconds,
        )
        for mode in jit_modes
    }
    fastest = min(jit_modes, key=lambda mode: same[mode]["builtin_ms"])
    results = []
    for mode in jit_modes:
        if mode == fastest:
            against = dict(same[mode])
        else:
            against = time_pair(
                found["rotconv", mode],
                found["builtin", fastest],
                batch,
                blocks,
                block_seconds,
            )
        against["builtin_jit_compile"] = fastest
        against["builtin_ms_by_mode"] = {
            str(m): same[m]["builtin_ms"] for m in jit_modes
        }
        result = {"case": case.name, "jit_compile": mode, **same[mode]}
        result["first_step_s"] = {
            kind: first_step[kind, mode] for kind in ("rotconv", "builtin")
        }
        result["against_fastest"] = against
        result["kernel_gradient_forms"] = forms
        if cuda_memory:
            rot_bytes, builtin_bytes = (
                cuda_step_memory(found[kind, mode], batch)
                for kind in ("rotconv", "builtin")
            )
            result.update(
                rotconv_bytes=rot_bytes,
                builtin_bytes=builtin_bytes,
                memory_ratio=rot_bytes / builtin_bytes,
            )
        results.append(result)
    return results


def compiles_alone(jit_modes) -> None:
    """On torch with ``torch.compile``, compile each case's models as if
    each were alone in its process: fresh caches, static shapes and room
    for every layer's graph.

    The four models of a case share Keras's code (``Layer.forward``, whose
    graphs are guarded on the layer), and Keras's BatchNormalization
    breaks the graph (torch 2.13, Keras 3.15.1: Dynamo cannot pass its
    ``axes`` list to ``torch.mean``), so each layer gets graphs of its
    own. Under Dynamo's defaults the second model compiled then met the
    limit of 8 graphs per function and ran its layers eagerly (the package
    model: whichever twin compiled second took 100-120 ms a step, the
    first 150-180), or, with a higher limit, met symbolic sizes that
    Inductor failed to lower for the built-in twin.
    """
    if keras.backend.backend() != "torch" or True not in jit_modes:
        return
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 64


def cuda_memory_measured() -> bool:
    """Whether the steps run on torch's CUDA device, whose allocator keeps
    peak statistics."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.cuda.is_available()


def cuda_step_memory(model, batch, repeats: int = 3) -> int:
    """Peak bytes torch's CUDA allocator handed out during a train step
    above what it held at the step's start; the median over ``repeats``
    steps. The allocator counts each tensor's bytes (rounded to its 512-byte
    blocks), not what it caches."""
    import torch

    peaks = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model.train_on_batch(*batch)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
    return int(statistics.median(peaks))


def step_memory(model, batch, repeats: int) -> int:
    """Peak bytes requested from TensorFlow's CPU allocator and not yet
    freed during a train step, counted from the step's start; the median
    over ``repeats`` steps.

    The allocator reports each allocation and deallocation, with the bytes
    requested, to TensorFlow's profiler (its BFC variant does, which needs
    ``TF_CPU_ALLOCATOR_USE_BFC=true``), so the running sum over a profiled
    step is exact, and unaffected by how the allocator rounds and caches.
    """
    import tensorflow as tf

    model.train_on_batch(*batch)  # trace, compile and allocate the state
    peaks = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as logdir:
            tf.profiler.experimental.start(logdir)
            model.train_on_batch(*batch)
            tf.profiler.experimental.stop()
            peaks.append(_peak_requested_bytes(logdir))
    return int(statistics.median(peaks))


def _peak_requested_bytes(logdir: str) -> int:
    # A generated protocol buffer module that TensorFlow ships for its own
    # profiler tools; the trace's file format.
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    sign = {"MemoryAllocation": 1, "MemoryDeallocation": -1}
    changes = []
    for path in glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True):
        with open(path, "rb") as f:
            space = xplane_pb2.XSpace.FromString(f.read())
        for plane in space.planes:
            stat_names = {i: m.name for i, m in plane.stat_metadata.items()}
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    if name not in sign:
                        continue
                    requested = next(
                        s.uint64_value or s.int64_value
                        for s in event.stats
                        if stat_names[s.metadata_id] == "requested_bytes"
                    )
                    time_ps = line.timestamp_ns * 1000 + event.offset_ps
                    changes.append((time_ps, sign[name] * requested))
    running = peak = 0
    for _, change in sorted(changes):
        running += change
        peak = max(peak, running)
    return peak


# The environment variable that hands the timing process's choices of form
# to the memory worker: a Python literal of (key, form name) pairs.
CHOICES_VARIABLE = "KERAS_ROTCONV_BENCHMARK_CHOICES"


def adopt_choices() -> None:
    """Takes the forms chosen in the timing process as this process's own
    (``CHOICES_VARIABLE``); shapes it did not meet are timed here."""
    import ast

    for key, name in ast.literal_eval(os.environ.get(CHOICES_VARIABLE, "[]")):
        _tuning._chosen[key] = name


def memory_worker(case_names, quick, jit_modes):
    """Runs in the BFC-allocator process: prints one JSON line per case and
    ``jit_compile`` setting, with the forms it chose itself (shapes the
    timing process did not hand over; none when it ran first)."""
    adopt_choices()
    repeats = 1 if quick else 7
    for case in CASES:
        if case.name not in case_names:
            continue
        for jit_compile in jit_modes:
            rot, builtin, batch = twins(case, quick, jit_compile)
            before = _tuning.chosen()
            result = {
                "case": case.name,
                "jit_compile": jit_compile,
                "rotconv_bytes": step_memory(rot, batch, repeats),
                "builtin_bytes": step_memory(builtin, batch, repeats),
                "kernel_gradient_forms": new_choices(before),
            }
            print(json.dumps(result), flush=True)


def start_memory(
    case_names, quick, jit_modes, choices=None
) -> subprocess.Popen:
    """Starts the memory measurement in a separate process with the BFC
    allocator; ``collect_memory`` waits for its results. ``choices``
    (``_tuning.chosen()`` of the timing process) are handed over, so that
    the memory is that of the forms timed."""
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    if choices:
        env[CHOICES_VARIABLE] = repr(list(choices.items()))
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-worker",
        "--cases",
        json.dumps(case_names),
        "--jit",
        json.dumps(jit_modes),
    ]
    if quick:
        command.append("--quick")
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def collect_memory(process: subprocess.Popen) -> dict:
    """``{(case, jit_compile): (rotconv_bytes, builtin_bytes, forms)}`` from
    the process ``start_memory`` started."""
    stdout, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(f"the memory worker failed:\n{stderr[-3000:]}")
    results = [
        json.loads(line) for line in stdout.splitlines() if line[:1] == "{"
    ]
    return {
        (r["case"], r["jit_compile"]): (
            r["rotconv_bytes"],
            r["builtin_bytes"],
            r["kernel_gradient_forms"],
        )
        for r in results
    }


# The ISA flags recorded with every run; TensorFlow's x86 Linux builds turn
# oneDNN on by default when the CPU has any of the last three.
ISA_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
ONEDNN_DEFAULT_FLAGS = {"avx512_vnni", "avx512_bf16", "amx_tile"}


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its ISA flags, from /proc/cpuinfo (Linux;
    elsewhere the platform's processor name and no flags)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return model, flags
    named = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not named:
            model, named = value.strip(), True
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def onednn(flags: set[str], backend: str) -> dict:
    """TensorFlow's oneDNN setting: ``TF_ENABLE_ONEDNN_OPTS`` when set,
    otherwise TensorFlow's default for this CPU; on the TensorFlow backend
    also what TensorFlow itself reports."""
    variable = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    default = "on" if ONEDNN_DEFAULT_FLAGS & flags else "off"
    setting = {
        "TF_ENABLE_ONEDNN_OPTS": variable,
        "tensorflow_default": default,
        "applies": "tensorflow_default" if variable is None else "variable",
        "effective": default,
    }
    if variable is not None:
        on = variable.strip().lower() in ("1", "true")
        setting["effective"] = "on" if on else "off"
    if backend == "tensorflow":
        try:
            from tensorflow.python.util import _pywrap_util_port
        except ImportError:
            return setting
        on = _pywrap_util_port.IsMklEnabled()
        setting["tensorflow_reports"] = "on" if on else "off"
    return setting


def git_commit() -> dict:
    """The checkout's commit, and whether files outside benchmarks/results
    (which this script rewrites) differ from it; None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(
            ["git", *args],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changes = git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)benchmarks/results",
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changes)}


def command_line(argv: list[str]) -> str:
    """The command that ran, with the environment variables that change
    the results in front."""
    names = ("KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS")
    env = [f"{n}={os.environ[n]}" for n in names if n in os.environ]
    python = os.path.basename(sys.executable)
    return shlex.join([*env, python, sys.argv[0], *argv])


def machine(argv: list[str]) -> dict:
    """Where and how the run ran."""
    cpu, flags = cpu_info()
    versions = {"keras": keras.__version__, "numpy": np.__version__}
    backend = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    versions[backend] = __import__(module[backend]).__version__
    git = git_commit()
    return {
        "cpu": cpu,
        "cpu_flags": {flag: flag in flags for flag in ISA_FLAGS},
        "onednn": onednn(flags, backend),
        "accelerator": accelerator(backend),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": backend,
        "versions": versions,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "command": command_line(argv),
    }


def accelerator(backend: str) -> str | None:
    """The GPU the backend computes on, or None on the CPU."""
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return None if device.platform == "cpu" else device.device_kind
    if backend == "torch":
        import torch

        return (
            torch.cuda.get_device_name() if torch.cuda.is_available() else None
        )
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name if gpus else None


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["case"] for r in results))
    modes = sorted({r["jit_compile"] for r in results})
    series = [
        (f"time, jit_compile={m}", lambda r: r["time_ratio"], m) for m in modes
    ]
    series += [
        (
            f"time vs fastest built-in, jit_compile={m}",
            lambda r: r["against_fastest"]["time_ratio"],
            m,
        )
        for m in modes
    ]
    if any("memory_ratio" in r for r in results):
        series += [
            (f"memory, jit_compile={m}", lambda r: r["memory_ratio"], m)
            for m in modes
        ]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 5))
    for i, (label, value, mode) in enumerate(series):
        by_case = {
            r["case"]: value(r) for r in results if r["jit_compile"] == mode
        }
        values = [by_case.get(name, np.nan) for name in names]
        positions = np.arange(len(names)) + (i - (len(series) - 1) / 2) * width
        ax.bar(positions, values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.05, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("RotConv / built-in (log scale)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_jit_modes(backend: str, torch_compile: bool = False) -> list:
    """The ``jit_compile`` settings a user of the backend can pick: both on
    TensorFlow; JAX trains jitted (without, each op runs on its own, which
    no one trains with); torch eagerly, and with ``torch.compile`` when
    asked (it is slow to trace on the CPU)."""
    return {
        "tensorflow": [False, True],
        "jax": [True],
        "torch": [False, True] if torch_compile else [False],
    }[backend]


def format_table(results, with_memory) -> str:
    header = (
        "| case | jit_compile | RotConv ms | built-in ms | time ratio "
        "| CPU-time ratio | fastest built-in | its ms | time ratio vs "
        "fastest | CPU-time ratio vs fastest |"
    )
    rule = "| --- | --- |" + " ---: |" * 4 + " --- |" + " ---: |" * 3
    if with_memory:
        header += " memory ratio |"
        rule += " ---: |"
    lines = [header, rule]
    for r in results:
        fast = r["against_fastest"]
        line = (
            f"| {r['case']} | {r['jit_compile']} | {r['rotconv_ms']:.2f} | "
            f"{r['builtin_ms']:.2f} | {r['time_ratio']:.2f} | "
            f"{r['cpu_ratio']:.2f} | "
            f"jit_compile={fast['builtin_jit_compile']} | "
            f"{fast['builtin_ms']:.2f} | {fast['time_ratio']:.2f} | "
            f"{fast['cpu_ratio']:.2f} |"
        )
        if with_memory:
            line += f" {r['memory_ratio']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and short blocks: checks that the script works",
    )
    parser.add_argument("--blocks", type=int, help="interleaved blocks")
    parser.add_argument(
        "--block-seconds", type=float, help="time per model and block"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="NAME",
        help="cases to run, by name or part of a name, any case "
        "(default: all; see --list-cases)",
    )
    parser.add_argument(
        "--list-cases", action="store_true", help="print the case names"
    )
    parser.add_argument(
        "--jit", help="JSON list of jit_compile settings (default: backend's)"
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="on torch, also time jit_compile=True (torch.compile)",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the memory measurement"
    )
    parser.add_argument(
        "--textbook",
        action="store_true",
        help="RotConv runs keras_rotconv.rules only (textbook_rules()): no "
        "cheaper form, no timed choice (time only)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="folder for the JSON and PNG results",
    )
    parser.add_argument("--memory-worker", action="store_true", help="internal")
    return parser, parser.parse_args(argv)


def select_cases(patterns, parser) -> list[str]:
    """The names of the cases that ``patterns`` pick: a pattern equal to a
    name picks that case alone, any other picks every case whose name
    contains it (ignoring case). A JSON list is read as the patterns."""
    names = [case.name for case in CASES]
    if not patterns:
        return names
    if len(patterns) == 1 and patterns[0].startswith("["):
        patterns = json.loads(patterns[0])
    picked, unmatched = set(), []
    for pattern in patterns:
        found = (
            {pattern}
            if pattern in names
            else {n for n in names if pattern.lower() in n.lower()}
        )
        if not found:
            unmatched.append(pattern)
        picked |= found
    if unmatched:
        parser.error(f"no case matches {unmatched}; see --list-cases")
    return [name for name in names if name in picked]


def runnable(wanted) -> list[Case]:
    """The wanted cases whose RotConv layer keras_rotconv has."""
    cases = []
    for case in CASES:
        if case.name not in wanted:
            continue
        if not hasattr(keras_rotconv, ROTCONV[case.rank]):
            print(
                f"skipped {case.name!r}: keras_rotconv has no "
                f"{ROTCONV[case.rank]}"
            )
            continue
        cases.append(case)
    return cases


def print_result(result, with_memory):
    fast = result["against_fastest"]
    print(
        f"{result['case']:36s} jit_compile={result['jit_compile']!s:5s} "
        f"time {result['time_ratio']:.3f} "
        f"(cpu {result['cpu_ratio']:.3f}), "
        f"vs fastest built-in (jit_compile={fast['builtin_jit_compile']}) "
        f"{fast['time_ratio']:.3f}"
        + (f"  memory {result['memory_ratio']:.3f}" if with_memory else "")
        + "  first step {rotconv:.1f} / {builtin:.1f} s".format(
            **result["first_step_s"]
        ),
        flush=True,
    )


def measure(cases, args, jit_modes, with_memory) -> list[dict]:
    """Times every case in every mode and, with ``with_memory``, adds the
    memory of the worker process."""
    names = [c.name for c in cases]
    worker = None
    if with_memory and args.quick:
        # The quick mode times while the worker measures: it checks that
        # the script works, not the numbers.
        worker = start_memory(names, args.quick, jit_modes)
    results = []
    for case in cases:
        results += time_case(
            case,
            args.quick,
            jit_modes,
            args.blocks,
            args.block_seconds,
            cuda_memory=cuda_memory_measured() and not args.no_memory,
        )
    if with_memory and worker is None:
        # After the timing (the worker would load the machine), with the
        # forms it chose.
        worker = start_memory(names, args.quick, jit_modes, _tuning.chosen())
    memory = collect_memory(worker) if with_memory else {}
    for result in results:
        if with_memory:
            key = result["case"], result["jit_compile"]
            rot_bytes, builtin_bytes, forms = memory[key]
            result.update(
                rotconv_bytes=rot_bytes,
                builtin_bytes=builtin_bytes,
                memory_ratio=rot_bytes / builtin_bytes,
                memory_forms_chosen_apart=forms,
            )
        print_result(result, "memory_ratio" in result)
    return results


def write_report(report: dict, out: str, stem: str) -> str:
    """Writes ``report`` to ``<out>/<stem>.json`` (making ``out``); returns
    the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, stem + ".json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args = parse_args(argv)
    if args.list_cases:
        print("\n".join(case.name for case in CASES))
        return 0
    backend = keras.backend.backend()
    jit_modes = (
        json.loads(args.jit)
        if args.jit
        else default_jit_modes(backend, args.torch_compile)
    )
    wanted = select_cases(args.cases, parser)
    args.blocks = args.blocks or (7 if args.quick else 11)
    args.block_seconds = args.block_seconds or (0.02 if args.quick else 0.5)
    if args.memory_worker:
        memory_worker(wanted, args.quick, jit_modes)
        return 0
    with_memory = backend == "tensorflow" and not args.no_memory
    if backend != "tensorflow" and not cuda_memory_measured():
        print("memory is measured on tensorflow and on torch's CUDA only")
    report = {"machine": machine(argv)}
    if args.textbook:
        with_memory = False  # (the memory worker would run the forms)
    with keras_rotconv.textbook_rules() if args.textbook else nullcontext():
        results = measure(runnable(wanted), args, jit_modes, with_memory)
    print()
    print(format_table(results, all("memory_ratio" in r for r in results)))
    report["settings"] = {
        "quick": args.quick,
        "textbook_rules": args.textbook,
        "blocks": args.blocks,
        "block_seconds": args.block_seconds,
        "jit_modes": jit_modes,
        "ratios": RATIOS,
    }
    report["results"] = results
    stem = (
        f"benchmark_{backend}"
        + ("_textbook" if args.textbook else "")
        + ("_quick" if args.quick else "")
    )
    write_report(report, args.out, stem)
    plot(
        results,
        os.path.join(args.out, stem + ".png"),
        f"RotConv / built-in Keras layer, {backend} on "
        f"{report['machine']['accelerator'] or report['machine']['cpu']}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
