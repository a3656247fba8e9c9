"""Where a RotConv train step's time goes: each part of the layer, in every
form the package offers, timed against the same part of the built-in layer.

``benchmark.py`` times whole train steps; this script takes one layer apart.
For each case (the one-layer cases of ``benchmark.py``, same shapes) it
times, in the backend's compiled form (``tf.function``, ``jax.jit``; torch
eager):

- the forward convolution, ours (``_backend.correlate``) and the built-in
  (``keras.ops.conv``);
- the input delta: each form (``rules.input_delta``, and the phase split
  where the layer is strided) against the built-in layer's input gradient,
  which is the backend's own autodiff of ``keras.ops.conv`` (the oracle
  here, not part of the package);
- the kernel gradient: each form ``keras_rotconv.ops`` chooses among, and
  the textbook rule (the same function as the form "convolution" where
  no phase split applies), against the built-in kernel gradient;
- "one tap's product": the kernel gradient's matrix product for a single
  tap (no window copied), whose time, times the number of taps, is the
  least the tap forms can cost.

Each part is timed ``--rounds`` times, interleaved with the others (each
time the median of ``--calls`` calls), and the median of those is printed
as milliseconds and as a ratio to the built-in part it replaces. The
"step" line adds the forward pass, the fastest input delta and the fastest
kernel gradient (a first layer has no input delta) and compares the sum
with the built-in parts' sum; a train step adds the loss, the optimizer and
the bias gradient to both. It writes JSON (with ``benchmark.py``'s record
of the machine) to ``--out``.

    TF_ENABLE_ONEDNN_OPTS=1 PYTHONPATH=$PWD python benchmarks/rule_timings.py
    KERAS_BACKEND=torch PYTHONPATH=$PWD python benchmarks/rule_timings.py \\
        --cases 26x26 "stride 2"
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

import keras
import numpy as np

from keras_rotconv import _backend, rules
from keras_rotconv import ops as rotconv_ops
from keras_rotconv.forms import phases

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution: ``batch`` inputs of ``size`` per spatial axis."""

    name: str
    rank: int
    size: int
    channels: int
    filters: int
    batch: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: str = "same"
    first: bool = False

    def quick(self) -> Layer:
        return dataclasses.replace(
            self,
            size=min(self.size, 8),
            channels=min(self.channels, 8),
            filters=min(self.filters, 8),
            groups=min(self.groups, min(self.channels, 8)),
            batch=2,
        )


# The one-layer cases of benchmark.py, by the same names.
LAYERS = [
    Layer("3x3 32->64 valid, 26x26, batch 128", 2, 26, 32, 64, 128,
          padding="valid"),
    Layer("3x3 32->64 valid, 13x13, batch 128", 2, 13, 32, 64, 128,
          padding="valid"),
    Layer("3x3 64->64, 32x32, batch 16", 2, 32, 64, 64, 16),
    Layer("3x3 stride 2", 2, 32, 64, 64, 16, stride=2),
    Layer("3x3 dilation 2", 2, 32, 64, 64, 16, dilation=2),
    Layer("3x3 groups 4", 2, 32, 64, 64, 16, groups=4),
    Layer("3x3 depthwise", 2, 32, 64, 64, 16, groups=64),
    Layer("1x1", 2, 32, 64, 64, 16, kernel=1),
    Layer("7x7 stride-2 stem, 3->64, 64x64", 2, 64, 3, 64, 16, kernel=7,
          stride=2, first=True),
    Layer("1D k3 64->64, length 1024", 1, 1024, 64, 64, 16),
    Layer("3D 3x3x3 16->16, 16^3", 3, 16, 16, 16, 4),
]  # fmt: skip


def compiled(function):
    """``function`` as the backend runs a train step: traced by
    ``tf.function`` or ``jax.jit``; as it is on torch (eager)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, autograph=False)
    if backend == "jax":
        import jax

        return jax.jit(function)
    return function


def finished(value):
    """Wait until ``value`` is computed (and, on a GPU, copied back)."""
    return keras.ops.convert_to_numpy(value)


def builtin_gradients(layer: Layer, strides, dilation):
    """The built-in layer's input and kernel gradients for an upstream
    delta: the backend's own autodiff of ``keras.ops.conv``."""
    backend = keras.backend.backend()

    def forward(x, w):
        return keras.ops.conv(
            x, w, strides, layer.padding, dilation_rate=dilation
        )

    if backend == "tensorflow":
        import tensorflow as tf

        def gradient(index):
            def grad(x, w, delta):
                with tf.GradientTape() as tape:
                    tape.watch((x, w))
                    z = forward(x, w)
                return tape.gradient(z, (x, w), delta)[index]

            return grad

    elif backend == "jax":
        import jax

        def gradient(index):
            def grad(x, w, delta):
                return jax.vjp(forward, x, w)[1](delta)[index]

            return grad

    else:
        import torch

        def gradient(index):
            graphs = {}

            def grad(x, w, delta):
                # The forward pass once, outside the timing (TensorFlow and
                # XLA drop it from a gradient that does not read it).
                key = (id(x), id(w))
                if key not in graphs:
                    x = x.detach().requires_grad_(index == 0)
                    w = w.detach().requires_grad_(index == 1)
                    with torch.enable_grad():
                        graphs[key] = (forward(x, w), (x, w)[index])
                z, wrt = graphs[key]
                return torch.autograd.grad(z, wrt, delta, retain_graph=True)[0]

            return grad

    return forward, gradient(0), gradient(1)


def parts(layer: Layer) -> tuple[dict, tuple, int]:
    """Every part to time, name to ``(kind, function)``; the arguments
    ``(x, w, delta)``; the number of taps. Kinds: ``forward``, ``input
    delta``, ``kernel gradient``, each with a ``built-in`` part to compare
    with, and ``tap``."""
    rank = layer.rank
    spatial = (layer.size,) * rank
    kernel_size = (layer.kernel,) * rank
    strides, dilation = (layer.stride,) * rank, (layer.dilation,) * rank
    pairs = rotconv_ops.padding_pairs(
        spatial, kernel_size, strides, dilation, layer.padding
    )
    groups = layer.groups
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(
        rng.standard_normal((layer.batch, *spatial, layer.channels)),
        "float32",
    )
    w = keras.ops.convert_to_tensor(
        rng.standard_normal(
            (*kernel_size, layer.channels // groups, layer.filters)
        ),
        "float32",
    )
    lengths = [
        rotconv_ops.output_size(n, k, s, d, pair)
        for n, k, s, d, pair in zip(
            spatial, kernel_size, strides, dilation, pairs
        )
    ]
    delta = keras.ops.convert_to_tensor(
        rng.standard_normal((layer.batch, *lengths, layer.filters)),
        "float32",
    )
    conv_args = (kernel_size, strides, pairs, dilation, groups)

    forward, input_gradient, kernel_gradient = builtin_gradients(
        layer, strides, dilation
    )
    table = {
        "forward, built-in": (
            "forward built-in",
            lambda x, w, d: forward(x, w),
        ),
        "forward": (
            "forward",
            lambda x, w, d: _backend.correlate(
                x, w, strides, dilation, groups, pairs
            ),
        ),
    }
    if not layer.first:
        table["input delta, built-in"] = (
            "input delta built-in",
            input_gradient,
        )
        table["input delta: rule"] = (
            "input delta",
            lambda x, w, d: rules.input_delta(
                d, w, spatial, strides, pairs, dilation, groups
            ),
        )
        if phases.applies_to_input_delta(strides, dilation):
            table["input delta: phase split"] = (
                "input delta",
                lambda x, w, d: phases.input_delta_by_phases(
                    d, w, spatial, strides, pairs, groups
                ),
            )
    table["kernel gradient, built-in"] = (
        "kernel gradient built-in",
        kernel_gradient,
    )
    forms = rotconv_ops._kernel_gradient_forms(x, delta, *conv_args)
    for name, form in forms.items():
        table[f"kernel gradient: {name}"] = (
            "kernel gradient",
            lambda x, w, d, form=form: form(x, d),
        )
    table["kernel gradient: textbook rule"] = (
        "kernel gradient",
        lambda x, w, d: rules.kernel_gradient(x, d, *conv_args),
    )
    if groups == 1:
        table["one tap's product"] = ("tap", _one_tap)
    return table, (x, w, delta), math.prod(kernel_size)


def _one_tap(x, w, delta):
    """The kernel gradient's matrix product for one tap, with no copy: as
    many rows of the input, ``(N·∏L, C_in)``, times the delta's rows.
    The tap forms make one such product per tap (the strided windows
    are copies besides)."""
    deltas = keras.ops.reshape(delta, (-1, delta.shape[-1]))
    rows = keras.ops.reshape(x, (-1, x.shape[-1]))[: deltas.shape[0]]
    return _backend.transposed_product(rows, deltas)


def time_parts(table, args, rounds: int, calls: int) -> dict[str, float]:
    """Median milliseconds of each part: ``rounds`` rounds, the parts in
    turn within each (the order reversed every other round), each round
    the median of ``calls`` calls after one untimed call."""
    functions = {name: compiled(f) for name, (_, f) in table.items()}
    for f in functions.values():
        finished(f(*args))
    samples = {name: [] for name in table}
    names = list(table)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            f = functions[name]
            finished(f(*args))
            seconds = []
            for _ in range(calls):
                start = time.perf_counter()
                finished(f(*args))
                seconds.append(time.perf_counter() - start)
            samples[name].append(statistics.median(seconds))
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def summary(table, ms: dict, taps: int) -> dict:
    """Each part's ratio to its built-in counterpart, and the step's sum."""
    builtin = {
        kind.removesuffix(" built-in"): ms[name]
        for name, (kind, _) in table.items()
        if kind.endswith(" built-in")
    }
    rows = []
    best = {}
    for name, (kind, _) in table.items():
        if kind.endswith(" built-in"):
            continue
        reference = builtin.get(kind, builtin["kernel gradient"])
        value = ms[name] * (taps if kind == "tap" else 1)
        rows.append(
            {
                "part": name,
                "ms": ms[name],
                "ratio": value / reference,
                "times_taps": kind == "tap",
            }
        )
        if kind != "tap" and (kind not in best or ms[name] < best[kind]):
            best[kind] = ms[name]
    rot, ref = sum(best.values()), sum(builtin.values())
    return {
        "builtin_ms": builtin,
        "parts": rows,
        "step": {"rotconv_ms": rot, "builtin_ms": ref, "ratio": rot / ref},
    }


def print_case(name: str, result: dict) -> None:
    print(f"\n{name}")
    for kind, value in result["builtin_ms"].items():
        print(f"  {kind + ', built-in':42s} {value:8.2f} ms")
    for row in result["parts"]:
        note = " (times the taps)" if row["times_taps"] else ""
        print(
            f"  {row['part']:42s} {row['ms']:8.2f} ms  "
            f"{row['ratio']:5.2f}{note}"
        )
    step = result["step"]
    print(
        f"  {'step (fastest forms)':42s} {step['rotconv_ms']:8.2f} ms  "
        f"{step['ratio']:5.2f}  (built-in {step['builtin_ms']:.2f} ms)"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", metavar="NAME")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    layers = [
        layer
        for layer in LAYERS
        if not args.cases or any(p in layer.name for p in args.cases)
    ]
    if not layers:
        parser.error(f"no case matches --cases {args.cases}")
    if args.quick:
        layers = [layer.quick() for layer in layers]
        args.rounds, args.calls = 1, 1
    report = {
        "machine": benchmark.machine(argv),
        "settings": {"rounds": args.rounds, "calls": args.calls},
        "results": {},
    }
    for layer in layers:
        table, tensors, taps = parts(layer)
        ms = time_parts(table, tensors, args.rounds, args.calls)
        result = summary(table, ms, taps)
        report["results"][layer.name] = result
        print_case(layer.name, result)
    if args.out:
        suffix = "_quick" if args.quick else ""
        path = benchmark.write_report(
            report, args.out, f"rule_timings_{keras.backend.backend()}{suffix}"
        )
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
