"""The backend seam: what the derivation cannot say in ``keras.ops``.

``correlate`` is a plain strided, dilated, grouped convolution of a
zero-padded input in channels-last layout, the forward primitive every rule
is built from; ``add_bias`` adds the bias. ``custom_gradient`` attaches a
backward function to a forward one using the backend's own mechanism.
``pad`` is zero padding. The formulas live in ``keras_rotconv.rules`` (and
their cheaper forms in ``keras_rotconv.forms``) and are written once; what
differs here is how each backend computes the same values fastest (padding
read by the convolution rather than written out, TensorFlow's depthwise and
bias-add ops, JAX's sums over the taps for groups of one channel on the
CPU) and lays them out in memory (TensorFlow's group blocks,
pre-padding and graph ordering, torch's shared filter).

The backend-neutral part is here; ``tensorflow.py``, ``jax.py`` and
``torch.py`` beside it hold each backend's own, as Keras keeps its backends
in ``keras/src/backend/<name>/``. Only the running backend's module is
imported.
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Callable, Sequence

import keras

from keras_rotconv import _shapes

_BACKEND = keras.backend.backend()


class _Unsupported:
    def __getattr__(self, name):
        raise ValueError(
            "keras_rotconv runs on the tensorflow, jax and torch backends. "
            f"Received: backend={_BACKEND}"
        )


_impl = (
    importlib.import_module(f"keras_rotconv._backend.{_BACKEND}")
    if _BACKEND in ("tensorflow", "jax", "torch")
    else _Unsupported()
)


# ``keras.ops`` for the rules and their forms. On torch, the calls a
# backward pass makes many times per step go straight to torch
# (``torch.DIRECT_OPS``): every ``keras.ops`` call first walks its arguments
# as a tree looking for symbolic tensors, and that took 3 to 20 µs a call,
# as long as the operation itself on small tensors; a GPU step is mostly
# such calls. (Figures: benchmarks/results/README.md, "Measured figures".)
# TensorFlow and JAX trace the backward pass once per graph, so the walk
# costs nothing per step there.
ops = keras.ops
if hasattr(_impl, "DIRECT_OPS"):
    ops = types.SimpleNamespace(
        **{name: getattr(keras.ops, name) for name in dir(keras.ops)}
    )
    vars(ops).update(_impl.DIRECT_OPS)


def correlate(
    x,
    w,
    strides: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    pairs: Sequence[tuple] | None = None,
):
    """``out[n, p, o] = Σ_{k, i} x̂[n, p·strides + k·dilation, i] w[k, i, o]``,
    each group of channels on its own, where ``x̂`` is ``x`` with
    ``pairs[axis] = (before, after)`` zeros added to each spatial axis (none
    by default), or ``-before`` (``-after``) entries cut off where negative.

    ``x`` is ``(N, *S, C_in)``, ``w`` is ``(*K, C_in // groups, C_out)``.
    Where the backend's convolution can pad as it reads, the padded copy of
    ``x`` is never written out.
    """
    x, pairs = _padded_as_read(x, pairs, len(strides))
    empty = _empty_result(x, w, strides, dilation, pairs)
    if empty is not None:
        return keras.ops.zeros(empty, dtype=x.dtype)
    one_window = _one_window_unstrided(x, w, strides, dilation, pairs)
    if one_window is None:
        shape = _result_shape(x, w, strides, dilation, pairs)
        return keras.ops.zeros(shape, dtype=x.dtype)
    x, strides, pairs = one_window
    return _impl.correlate(x, w, tuple(strides), tuple(dilation), groups, pairs)


def _padded_as_read(x, pairs, rank):
    """``x`` cropped where a width is negative, and the padding left for the
    convolution to add as it reads; or, where the widths are known only
    when the graph runs, or traced by ``torch.compile``, ``x`` padded (and
    cropped) by a copy, and no padding left. (The torch.compile tracer
    proves slowly what a cropping or the convolution's own padding needs to
    know about symbolic widths; ``F.pad`` takes negative widths as crops.)
    """
    pairs = tuple(pairs) if pairs is not None else ((0, 0),) * rank
    if all(_shapes.is_zero(v) for pair in pairs for v in pair):
        return x, pairs
    if traced_by_torch_compile():
        return pad(x, [(0, 0), *pairs, (0, 0)]), ((0, 0),) * rank
    x = _shapes.crop_negative(x, pairs)
    pairs = tuple(_shapes.added_zeros(pairs))
    if not _static(pairs):
        return pad(x, [(0, 0), *pairs, (0, 0)]), ((0, 0),) * rank
    return x, pairs


def _static(pairs) -> bool:
    return all(isinstance(v, int) for pair in pairs for v in pair)


def _result_shape(x, w, strides, dilation, pairs):
    """The shape of ``correlate``'s result (with static sizes)."""
    rank = len(strides)
    lengths = [
        max((n + lo + hi - (k - 1) * d - 1) // s + 1, 0)
        for n, k, s, d, (lo, hi) in zip(
            x.shape[1:-1], w.shape[:rank], strides, dilation, pairs
        )
    ]
    return (x.shape[0], *lengths, w.shape[-1])


def _empty_result(x, w, strides, dilation, pairs):
    """The result's shape when it is empty or a sum of no terms, else None.

    Backends refuse such convolutions (an input shorter than the kernel, a
    kernel or a channel axis of size zero), yet the backward rules meet them
    whenever a batch or an input is empty: the kernel gradient of an empty
    batch is a correlation over zero "channels". Their value is zeros.
    """
    if any(n is None for n in (*x.shape, *w.shape)):
        return None
    shape = _result_shape(x, w, strides, dilation, pairs)
    if 0 in shape or 0 in w.shape:
        return shape
    return None


def _one_window_unstrided(x, w, strides, dilation, pairs):
    """``(x, strides, pairs)`` with stride 1 on every axis that has a single
    output position, ``x`` cut or padded to exactly that window; None if the
    window reads only padding (the result is then zeros).

    One window has no stride to speak of, and this keeps the convolution
    away from a oneDNN bug that TensorFlow's and torch's CPU kernels share
    (TensorFlow 2.21, torch 2.13): in float32, one input channel, an output
    width of 1 at a width stride above 1, an output height of at least 2
    and a batch of at least 2 give uninitialised memory, not the sums (the
    kernel gradient meets that shape at batch 1 with a dilated, one-tap
    kernel axis). See docs/backend-notes.md.
    """
    strides, pairs = list(strides), list(pairs)
    for axis, s in enumerate(strides):
        size = x.shape[axis + 1]
        if s == 1 or size is None:
            continue
        before, after = pairs[axis]
        span = (w.shape[axis] - 1) * dilation[axis] + 1
        if size + before + after - span >= s:
            continue  # a second window
        strides[axis] = 1
        read = span - before  # entries of x the window reads, at most
        if read <= 0:
            return None
        if read < size:
            index = [slice(None)] * len(x.shape)
            index[axis + 1] = slice(0, read)
            x = x[tuple(index)]
        pairs[axis] = (before, span - before - min(read, size))
    return x, tuple(strides), tuple(pairs)


def custom_gradient(forward: Callable, backward: Callable) -> Callable:
    """``forward(*tensors)`` whose gradient is ``backward(upstream,
    *tensors, needed=...)``.

    ``backward`` returns one gradient per tensor and is written with
    differentiable operations, so higher-order gradients follow it too.
    ``needed[i]`` is False where nothing will read the ``i``-th gradient,
    and ``backward`` may return None there instead of computing it. Only
    torch says so (a first layer's input, a frozen kernel: torch runs
    every operation it is given); a TensorFlow graph and a jitted JAX
    function drop the unread work themselves, so there every gradient is
    asked for.
    """
    return _impl.custom_gradient(forward, backward)


def pad(x, widths: Sequence[tuple[int, int]]):
    """``x`` with ``widths[axis] = (before, after)`` zeros added to each
    axis."""
    return _impl.pad(x, widths)


def add_bias(z, b):
    """``z + b``, ``b`` added along the last (channel) axis."""
    return _impl.add_bias(z, b)


def after(x, *earlier):
    """``x``, in a TensorFlow graph read only once ``earlier`` are computed
    (elsewhere ``x``: eager code runs in the order it is written, and XLA
    schedules on its own).

    A TensorFlow graph runs every op as soon as its inputs exist, so a
    backward rule's work on the layer's input alone would run during the
    forward pass, and two rules' temporaries would live at once; this
    orders them as eager mode would."""
    return _impl.after(x, *earlier)


def shared_filter(w):
    """``w``, a filter ``(*K, C_in, C_out)`` that several ``correlate``
    calls read, laid out once in the memory order the backend's
    convolution reads it in, so that each call does not copy it again.

    Only torch copies per call: its CPU convolution reads a filter as
    ``(C_out, *K, C_in)`` in memory next to a channels-last input (the
    layout ``correlate`` hands it), and 1D as ``(C_out, C_in, K)``.
    (Figures: benchmarks/results/README.md, "Measured figures".)
    """
    return _impl.shared_filter(w)


def runs_groups_apart(w_shape, strides, dilation, groups) -> bool:
    """Whether ``correlate`` computes a grouped convolution with kernel
    shape ``w_shape`` as one convolution per group (TensorFlow, outside its
    depthwise op), splitting the channels of ``x`` and ``w`` into copies. A
    caller that can lay out each group's operands contiguously in the
    leading axis, where a slice is a view, can call it per group instead and
    save those copies."""
    return _impl.runs_groups_apart(w_shape, strides, dilation, groups)


def sums_depthwise_taps() -> bool:
    """Whether ``kernel_gradient`` computes a depthwise kernel gradient at
    stride 1 tap by tap, as sums of products, rather than as a grouped
    convolution whose filter (the delta) is as large as the image.

    JAX and torch run that convolution slowly. TensorFlow runs it fast as
    one convolution per group (``runs_groups_apart``) and not the taps: a
    graph runs them side by side, each with its own products, and XLA took
    longer. (Figures: benchmarks/results/README.md, "Measured figures".)
    """
    return _impl.sums_depthwise_taps()


def summed_products(windows: Sequence, delta, leading: int) -> list:
    """``[Σ window · delta over the first leading axes, for each
    window]``: each window's products with ``delta``, summed over the
    batch and positions.

    torch eager writes every window's products into one buffer: each fresh
    temporary as large as the delta cost its page faults anew (a 3x3
    depthwise kernel gradient, 16x32x32x64: 17.5 ms with a product per
    tap, 2.2 ms with one buffer; benchmarks/results/README.md, "Measured
    figures"). Elsewhere, and wherever the sums are themselves
    differentiated, a product per window.
    """
    if hasattr(_impl, "summed_products"):
        return _impl.summed_products(windows, delta, leading)
    return _products_summed_apart(windows, delta, leading)


def _products_summed_apart(windows, delta, leading):
    axes = tuple(range(leading))
    return [ops.sum(window * delta, axis=axes) for window in windows]


def interleaves_in_place(phases: Sequence) -> bool:
    """Whether ``interleave_in_place`` puts these phases back: torch, where
    no gradient of them is recorded. Stacking them one axis at a time
    (``forms.phases.interleave``) writes the result once per strided axis;
    torch writes each phase into its place once (a stride-2 3x3 input
    delta, 16x32x32x64: 4.7 ms stacked, 3.5 in place;
    benchmarks/results/README.md, "Measured figures")."""
    if hasattr(_impl, "interleaves_in_place"):
        return _impl.interleaves_in_place(phases)
    return False


def interleave_in_place(phases: list, strides: Sequence[int]):
    """``forms.phases.interleave``, each phase written into its place in
    one buffer; empties ``phases``."""
    return _impl.interleave_in_place(phases, strides)


def pads_by_copy(rank: int) -> bool:
    """Whether ``correlate`` on ``rank`` spatial axes writes out a padded
    copy of ``x`` for padding TensorFlow's ``"SAME"`` rule does not cover
    (TensorFlow's 1D and 3D convolutions take no explicit padding)."""
    return _impl.pads_by_copy(rank)


def times_forms() -> bool:
    """Whether ``keras_rotconv._tuning`` times the forms of a rule to choose
    among them, or takes the first (TensorFlow while XLA compiles: there,
    forms chosen outside XLA raised the step's peak memory)."""
    return _impl.times_forms()


def time_forms(forms: Sequence[Callable], shapes, dtype) -> list[float]:
    """The seconds each ``form(x, delta)`` takes on random tensors of
    ``shapes`` and ``dtype``: the least of a few interleaved calls, after a
    first call that traces (TensorFlow) or compiles (JAX) and warms caches.
    Runs eagerly, even while a graph is traced. JAX reports ``math.inf``
    for a form whose compiled memory is too large to choose."""
    return _impl.time_forms(forms, shapes, dtype)


def transposed_product(a, b):
    """``aᵀ · b`` of two matrices ``(M, I)`` and ``(M, O)``, without
    writing ``aᵀ`` out (``keras.ops.matmul`` on torch returns float32 for
    float64 operands: docs/backend-notes.md)."""
    return _impl.transposed_product(a, b)


def product(a, b):
    """``a · b`` of two matrices ``(I, M)`` and ``(M, O)`` (not
    ``keras.ops.matmul``: see ``transposed_product``)."""
    return _impl.product(a, b)


def device_kind(x) -> str:
    """The kind of device ``x`` is on (``"CPU"``, ``"GPU"``, ...; empty
    where not placed yet): timings differ by kind, not between a kind's
    devices, such as the replicas of one ``tf.distribute`` strategy."""
    return _impl.device_kind(x)


def _least_seconds(calls: Sequence[Callable], repeats: int = 5):
    """The least wall time of ``repeats`` rounds of ``calls``, each call
    timed on its own, in turn, after one untimed round."""
    import time

    for call in calls:
        call()
    best = [math.inf] * len(calls)
    for _ in range(repeats):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def traced_by_torch_compile() -> bool:
    """Whether ``torch.compile`` is tracing the code that calls this.

    Its tracer hands sizes over as symbolic ints that pass for Python ints
    (``isinstance(size, int)`` holds), yet every comparison or division of
    one makes it prove a fact about all sizes: the phase split's reshapes
    then take minutes per layer to trace.
    """
    return _impl.traced_by_torch_compile()


def untraced(
    rule: Callable, shape, a, b, sizes, strides, pairs, dilation, groups
):
    """``rule(a, b, sizes, strides, pairs, dilation, groups)``, a tensor of
    ``shape``, for code that ``torch.compile`` traces (torch only).

    The tracer sees one op; ``rule`` (a module-level function: the op finds
    it by name) runs when the compiled step runs, on concrete tensors,
    with sizes as Python ints. So the cheaper forms run in a compiled step
    too, without the tracer proving facts about symbolic sizes (see
    ``traced_by_torch_compile``), and a form is timed and chosen as in
    eager mode. A rule that is itself differentiated (a gradient of the
    gradient) is traced as written instead: the op has no derivative.
    """
    return _impl.untraced(
        rule, shape, a, b, sizes, strides, pairs, dilation, groups
    )
