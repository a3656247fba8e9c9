"""Peak memory of one gradient step on a large input: RotConv2D against
keras.layers.Conv2D (TensorFlow only).

Each measurement runs in a fresh process started with
``TF_CPU_ALLOCATOR_USE_BFC=true``, the CPU allocator that keeps statistics:
the layer is built and run once on a small input (so that code paths and
caches are set up), the allocator's peak is reset, and one forward pass and
gradient (input, kernel, bias) runs on a ``1 x SIZE x SIZE x 3`` input.
Reported: the allocator's peak above what it held before the step (the
step's own memory) and the process's peak resident set (``ru_maxrss``,
which includes TensorFlow itself).

    PYTHONPATH=$PWD python benchmarks/peak_memory.py            # 1024 x 1024
    PYTHONPATH=$PWD python benchmarks/peak_memory.py --check    # exit 1 if
        # RotConv2D's step needs more than Conv2D's anywhere

Too slow for the test suite (a dozen processes importing TensorFlow), and
the numbers are the point, so it is a script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = {
    "stride1-same": dict(kernel_size=3, padding="same"),
    "stride2-same": dict(kernel_size=3, strides=2, padding="same"),
    "dilation2-valid": dict(kernel_size=3, dilation_rate=2),
}
LAYERS = ("Conv2D", "RotConv2D")
MODES = ("eager", "graph")


def measure(layer_name: str, case: str, mode: str, size: int, filters: int):
    """Runs in the child process: prints one JSON line."""
    import resource

    import keras
    import tensorflow as tf

    from keras_rotconv import RotConv2D

    cls = RotConv2D if layer_name == "RotConv2D" else keras.layers.Conv2D
    layer = cls(filters, **CASES[case])

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    if mode == "graph":
        step = tf.function(step, reduce_retracing=True)
    step(tf.ones((1, 32, 32, 3)))
    x = tf.random.stateless_normal((1, size, size, 3), seed=(0, 0))
    tf.config.experimental.reset_memory_stats("CPU:0")
    held = tf.config.experimental.get_memory_info("CPU:0")["current"]
    grads = step(x)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    assert all(g.shape is not None for g in grads)
    print(
        json.dumps(
            dict(
                layer=layer_name,
                case=case,
                mode=mode,
                step_peak_mib=(peak - held) / 2**20,
                process_maxrss_mib=resource.getrusage(
                    resource.RUSAGE_SELF
                ).ru_maxrss
                / 1024,
            )
        )
    )


def run(layer_name, case, mode, size, filters):
    env = {
        **os.environ,
        "TF_CPU_ALLOCATOR_USE_BFC": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        layer_name,
        case,
        mode,
        f"--size={size}",
        f"--filters={filters}",
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 if RotConv2D's step peak exceeds Conv2D's",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(*args.child, args.size, args.filters)
        return 0

    modes = MODES if args.mode == "both" else (args.mode,)
    print(
        f"input 1x{args.size}x{args.size}x3, {args.filters} filters; "
        "MiB: step peak (allocator) / process peak RSS"
    )
    print(f"{'case':16} {'mode':6} {'Conv2D':>17} {'RotConv2D':>17} ratio")
    worst = 0.0
    for case in CASES:
        for mode in modes:
            rows = {
                name: run(name, case, mode, args.size, args.filters)
                for name in LAYERS
            }
            ratio = (
                rows["RotConv2D"]["step_peak_mib"]
                / rows["Conv2D"]["step_peak_mib"]
            )
            worst = max(worst, ratio)
            cells = [
                "{step_peak_mib:7.1f} / {process_maxrss_mib:6.0f}".format(
                    **rows[name]
                )
                for name in LAYERS
            ]
            print(
                f"{case:16} {mode:6} {cells[0]:>17} {cells[1]:>17} {ratio:.2f}"
            )
    print(f"largest ratio: {worst:.2f}")
    return 1 if args.check and worst > 1.0 else 0


if __name__ == "__main__":
    sys.exit(main())
