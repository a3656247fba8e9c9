"""Train-step time and memory of RotConv layers against the built-in ones.

Every case builds the same model twice, once with the keras_rotconv layers
and once with their built-in Keras twins, gives both the same weights and the
same batch, and compiles both with the same optimizer, loss and
``jit_compile`` setting. Then:

* time: the two train steps run interleaved, in blocks of a few steps each
  (the order alternating from block to block), so that a change in the load
  of the machine hits both alike. A block's ratio is RotConv's time per step
  over the built-in layer's; the reported ratio is the median over the
  blocks.
* memory (TensorFlow only): the peak number of bytes TensorFlow's CPU
  allocator holds during one train step, above what it held just before the
  step (the weights, the optimizer state and the batch, which are the same
  for both twins). The allocator only keeps these statistics in its BFC
  variant, so this runs in a separate process started with
  ``TF_CPU_ALLOCATOR_USE_BFC=true``; XLA's buffers come from the same
  allocator, so the compiled cases are counted as well.

Results go to ``<out>/benchmark_<backend>[_quick].json`` and a bar chart next
to it. Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/benchmark.py            # the full run
    PYTHONPATH=$PWD python benchmarks/benchmark.py --quick    # tiny, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import keras_rotconv

BUILTIN = {1: "Conv1D", 2: "Conv2D", 3: "Conv3D"}
ROTCONV = {1: "RotConv1D", 2: "RotConv2D", 3: "RotConv3D"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: a model built from a conv layer class.

    ``build(conv, quick)`` returns ``(model, loss, x_shape, y_shape)``, with
    ``conv`` the layer class of rank ``rank`` to use.
    """

    name: str
    rank: int
    build: Callable


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


CASES = [
    Case("MNIST CNN, batch 128", 2, mnist_cnn),
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


def twins(case: Case, quick: bool, jit_compile: bool, seed: int = 0):
    """The RotConv model and its built-in twin, compiled, with equal
    weights, and one batch ``(x, y)`` for both."""
    models = []
    for names in (ROTCONV, BUILTIN):
        module = keras_rotconv if names is ROTCONV else keras.layers
        keras.utils.set_random_seed(seed)
        model, loss, x_shape, y_shape = case.build(
            getattr(module, names[case.rank]), quick
        )
        model.compile(
            optimizer=keras.optimizers.SGD(1e-4),
            loss=loss,
            jit_compile=jit_compile,
        )
        models.append(model)
    rot, builtin = models
    builtin.set_weights(rot.get_weights())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype("float32")
    if y_shape is None:
        y = rng.integers(0, 10, x_shape[0])
    else:
        y = rng.standard_normal(y_shape).astype("float32")
    batch = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y))
    return rot, builtin, batch


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


def time_case(case, quick, jit_compile, blocks, block_seconds):
    """Interleaved blocks of train steps of the two twins; see the module
    docstring."""
    rot, builtin, batch = twins(case, quick, jit_compile)
    # Warm up: trace and compile, then let caches settle.
    for model in (rot, builtin):
        time_steps(model, batch, 2)
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


def memory_worker(case_names, quick, jit_modes):
    """Runs in the BFC-allocator process: prints one JSON line per case and
    ``jit_compile`` setting."""
    repeats = 1 if quick else 7
    for case in CASES:
        if case.name not in case_names:
            continue
        for jit_compile in jit_modes:
            rot, builtin, batch = twins(case, quick, jit_compile)
            result = {
                "case": case.name,
                "jit_compile": jit_compile,
                "rotconv_bytes": step_memory(rot, batch, repeats),
                "builtin_bytes": step_memory(builtin, batch, repeats),
            }
            print(json.dumps(result), flush=True)


def start_memory(case_names, quick, jit_modes) -> subprocess.Popen:
    """Starts the memory measurement in a separate process with the BFC
    allocator; ``collect_memory`` waits for its results."""
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}
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
    """``{(case, jit_compile): (rotconv_bytes, builtin_bytes)}`` from the
    process ``start_memory`` started."""
    stdout, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(f"the memory worker failed:\n{stderr[-3000:]}")
    results = [
        json.loads(line) for line in stdout.splitlines() if line[:1] == "{"
    ]
    return {
        (r["case"], r["jit_compile"]): (r["rotconv_bytes"], r["builtin_bytes"])
        for r in results
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"keras": keras.__version__, "numpy": np.__version__}
    backend = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    versions[backend] = __import__(module[backend]).__version__
    return {
        "cpu": cpu,
        "accelerator": accelerator(backend),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": backend,
        "versions": versions,
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
    series = [(f"time, jit_compile={m}", "time_ratio", m) for m in modes]
    if any("memory_ratio" in r for r in results):
        series += [
            (f"memory, jit_compile={m}", "memory_ratio", m) for m in modes
        ]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 5))
    for i, (label, key, mode) in enumerate(series):
        values = [
            next(
                (
                    r.get(key, np.nan)
                    for r in results
                    if r["case"] == name and r["jit_compile"] == mode
                ),
                np.nan,
            )
            for name in names
        ]
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


def default_jit_modes(backend: str) -> list:
    # JAX trains jitted; torch.compile is a separate subject.
    return {"tensorflow": [False, True], "jax": [True], "torch": [False]}[
        backend
    ]


def format_table(results, with_memory) -> str:
    header = (
        "| case | jit_compile | RotConv ms | built-in ms | time ratio "
        "| CPU-time ratio |"
    )
    rule = "| --- | --- | ---: | ---: | ---: | ---: |"
    if with_memory:
        header += " memory ratio |"
        rule += " ---: |"
    lines = [header, rule]
    for r in results:
        line = (
            f"| {r['case']} | {r['jit_compile']} | {r['rotconv_ms']:.2f} | "
            f"{r['builtin_ms']:.2f} | {r['time_ratio']:.2f} | "
            f"{r['cpu_ratio']:.2f} |"
        )
        if with_memory:
            line += f" {r['memory_ratio']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
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
        "--cases", help="JSON list of case names (default: all)"
    )
    parser.add_argument(
        "--jit", help="JSON list of jit_compile settings (default: backend's)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the memory measurement"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="folder for the JSON and PNG results",
    )
    parser.add_argument("--memory-worker", action="store_true", help="internal")
    args = parser.parse_args(argv)

    backend = keras.backend.backend()
    jit_modes = json.loads(args.jit) if args.jit else default_jit_modes(backend)
    wanted = json.loads(args.cases) if args.cases else [c.name for c in CASES]
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown cases: {sorted(unknown)}")
    if args.memory_worker:
        memory_worker(wanted, args.quick, jit_modes)
        return 0

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
    blocks = args.blocks or (7 if args.quick else 11)
    block_seconds = args.block_seconds or (0.02 if args.quick else 0.5)
    with_memory = backend == "tensorflow" and not args.no_memory
    if backend != "tensorflow" and not args.no_memory:
        print("memory is measured on the tensorflow backend only")

    memory = {}
    worker = None
    if with_memory:
        worker = start_memory([c.name for c in cases], args.quick, jit_modes)
        if not args.quick:
            # Timed alone: the worker would load the machine.
            memory, worker = collect_memory(worker), None
    results = []
    for case in cases:
        for jit_compile in jit_modes:
            result = {"case": case.name, "jit_compile": jit_compile}
            result.update(
                time_case(case, args.quick, jit_compile, blocks, block_seconds)
            )
            results.append(result)
    if worker is not None:
        # The quick mode times while the worker measures: it checks that
        # the script works, not the numbers.
        memory = collect_memory(worker)
    for result in results:
        name = result["case"]
        if with_memory:
            rot_bytes, builtin_bytes = memory[name, result["jit_compile"]]
            result.update(
                rotconv_bytes=rot_bytes,
                builtin_bytes=builtin_bytes,
                memory_ratio=rot_bytes / builtin_bytes,
            )
        print(
            f"{name:36s} jit_compile={result['jit_compile']!s:5s} "
            f"time {result['time_ratio']:.3f} "
            f"(cpu {result['cpu_ratio']:.3f})"
            + (f"  memory {result['memory_ratio']:.3f}" if with_memory else ""),
            flush=True,
        )

    print()
    print(format_table(results, with_memory))
    os.makedirs(args.out, exist_ok=True)
    stem = f"benchmark_{backend}" + ("_quick" if args.quick else "")
    report = {
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "blocks": blocks,
            "block_seconds": block_seconds,
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        },
        "results": results,
    }
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(
        results,
        os.path.join(args.out, stem + ".png"),
        f"RotConv / built-in Keras layer, {backend} on "
        f"{report['machine']['accelerator'] or report['machine']['cpu']}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
