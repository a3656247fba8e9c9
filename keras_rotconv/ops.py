"""The convolution with the derived backward pass, for 1, 2 or 3 spatial axes.

This module is the derivation turned into code. In its notation, for one
convolutional layer with input ``a_prev``, kernel ``w`` and bias ``b``::

    forward:    z = a_prev * w + b
    delta:      delta_prev = (delta * rot180(w))_full        (input_delta)
    gradients:  dC/dw = a_prev ⋆ delta                        (kernel_gradient)
                dC/db = Σ delta                               (bias_gradient)

where ``*`` is the convolution a Keras conv layer computes (a cross-correlation
in signal-processing terms), ``rot180`` flips every spatial axis of the kernel
and swaps its input and output channels, ``(·)_full`` pads the delta so that
every input position a kernel tap ever touched receives its share, and ``⋆``
is a "valid" correlation. The factor ``⊙ act'(z_prev)`` of the derivation
belongs to the activation of the previous layer and is applied by ordinary
differentiation of that activation.

The general layer adds three things to the textbook case, and each has a
plain reading in the same rule:

* strides ``s``: the forward pass only visits every ``s``-th position, so the
  delta is first put back at those positions with zeros between them
  (``spread``) before the full convolution. The code computes the same sums
  without multiplying by those zeros: split into its ``s`` phases (the
  positions ``m·s + r``), a strided axis is a stride-1 axis per phase
  (``input_delta_by_phases``, and the phase split in ``kernel_gradient``);
* dilation ``d``: the kernel taps are ``d`` apart, so the rotated kernel is
  applied with the same dilation, and in the kernel gradient the delta is the
  sliding window while the input is sampled every ``d`` positions;
* groups: each group of input channels sees only its own group of filters,
  so ``rot180`` swaps channels group by group and the kernel gradient
  correlates each group's inputs with that group's deltas.

Everything here is channels-last: ``x`` is ``(N, *S, C_in)``, ``w`` is
``(*K, C_in // groups, C_out)``, ``b`` is ``(C_out,)`` and a delta is
``(N, *L, C_out)``. Padding is explicit, as one ``(before, after)`` pair per
spatial axis (see ``padding_pairs``).

The backward rules are themselves convolutions computed by ``conv``, so their
own gradients (second-order derivatives, such as a gradient penalty) are again
the derived ones. (Two exceptions, where the correlation is computed as the
sums it is and differentiated as such: the kernel gradient of a 1x1 kernel
at stride 1, one matrix product; and on JAX and torch that of a depthwise
kernel at stride 1, one sum of products per tap.) None of them calls a
framework's convolution-gradient kernel. Where a choice changes only the
cost (padding read by the convolution or written out, phases instead of
inserted zeros), the rules take the cheaper one; benchmarks/benchmark.py
measures the result against the built-in layers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import keras
from keras import ops

from keras_rotconv import _backend

Pairs = tuple[tuple[int, int], ...]


def effective_kernel_size(kernel_size: int, dilation: int) -> int:
    """The extent of ``kernel_size`` taps placed ``dilation`` apart."""
    return (kernel_size - 1) * dilation + 1


def padding_pairs(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    padding: str,
) -> Pairs:
    """The explicit ``(before, after)`` zero padding of each spatial axis.

    ``"valid"`` pads nothing. ``"same"`` pads so that the output has
    ``ceil(size / stride)`` positions, the odd extra zero going after, which is
    the rule of TensorFlow, JAX and Keras on every backend. ``"causal"`` (1D
    only) pads ``effective_kernel_size - 1`` zeros before.

    A size may be a scalar tensor (an axis whose length is only known when the
    graph runs) or a symbolic int (``torch.compile`` with dynamic shapes); the
    pairs then hold the same kind of value.
    """
    pairs = []
    for size, k, s, d in zip(spatial_shape, kernel_size, strides, dilation):
        span = effective_kernel_size(k, d)
        if padding == "valid":
            pairs.append((0, 0))
        elif padding == "causal":
            pairs.append((span - 1, 0))
        elif padding == "same" and s == 1:
            # Known without the size: the output keeps every position.
            pairs.append(((span - 1) // 2, span - 1 - (span - 1) // 2))
        elif padding == "same":
            total = _at_least_zero((-(-size // s) - 1) * s + span - size)
            pairs.append((total // 2, total - total // 2))
        else:
            raise ValueError(
                "Invalid value for argument `padding`. Expected 'valid', "
                f"'same' or 'causal'. Received: padding={padding}"
            )
    return tuple(pairs)


def output_size(
    size: int, kernel_size: int, stride: int, dilation: int, pad: tuple
) -> int:
    """How many positions a strided, dilated kernel visits on a padded axis."""
    span = effective_kernel_size(kernel_size, dilation)
    return (size + pad[0] + pad[1] - span) // stride + 1


def rot180(w, groups: int = 1):
    """The kernel rotated by 180 degrees: ``(*K, C_in/g, C_out)`` to
    ``(*K, C_out/g, C_in)``.

    Every spatial axis is flipped, and within each group the input and output
    channel axes trade places, so that the rotated kernel maps deltas of the
    layer's outputs back onto its inputs.
    """
    rank = len(w.shape) - 2
    *k, cin_g, cout = w.shape
    flipped = ops.flip(w, axis=tuple(range(rank)))
    per_group = ops.reshape(flipped, (*k, cin_g, groups, cout // groups))
    swapped = ops.transpose(per_group, (*range(rank), rank + 2, rank + 1, rank))
    return ops.reshape(swapped, (*k, cout // groups, groups * cin_g))


def spread(delta, strides: Sequence[int]):
    """Put a strided layer's delta back at the positions its outputs came
    from: ``stride - 1`` zeros between neighbouring entries of each axis.

    An output of length ``L`` becomes ``(L - 1) * stride + 1`` long.
    """
    for axis, s in enumerate(strides, start=1):
        if s == 1:
            continue
        shape = ops.shape(delta)
        length = shape[axis]
        # Give each entry a new axis of s - 1 trailing zeros, then let the
        # entries and their zeros interleave by merging the two axes.
        widths = [(0, 0)] * (len(shape) + 1)
        widths[axis + 1] = (0, s - 1)
        padded = _pad(ops.expand_dims(delta, axis + 1), widths)
        merged = ops.reshape(
            padded, (*shape[:axis], length * s, *shape[axis + 1 :])
        )
        delta = _crop(merged, axis, (length - 1) * s + 1)
    return delta


def input_delta(
    delta,
    w,
    spatial_shape: Sequence[int],
    strides: Sequence[int],
    pairs: Pairs,
    dilation: Sequence[int],
    groups: int = 1,
):
    """``delta_prev = (spread(delta) * rot180(w))_full``, cropped to the input.

    The full convolution pads the (spread) delta with ``span - 1`` zeros on
    each side, ``span`` being the dilated kernel's extent, and convolves with
    the rotated kernel at the layer's dilation, stride 1. Two corrections make
    it land exactly on the layer's input: the forward padding ``pairs`` is
    cropped back off (fewer zeros on each side), and input positions after
    the last window the stride reached (``rest`` below) get zeros, since no
    output depended on them.

    A strided layer computes the same sums without the zeros ``spread``
    inserts: see ``input_delta_by_phases``.
    """
    if _splits_into_phases(strides, dilation):
        return input_delta_by_phases(
            delta, w, spatial_shape, strides, pairs, groups
        )
    rank = len(strides)
    kernel_size = w.shape[:rank]
    widths = []
    for axis in range(rank):
        span = effective_kernel_size(kernel_size[axis], dilation[axis])
        before, after = pairs[axis]
        if strides[axis] == 1:
            # Every window start is an output: the last window ends at the
            # padded input's end, whether or not its size is known yet.
            rest = 0
        else:
            length = ops.shape(delta)[axis + 1]
            reached = (length - 1) * strides[axis] + span
            rest = spatial_shape[axis] + before + after - reached
        widths.append((span - 1 - before, span - 1 - after + rest))
    spread_delta = spread(delta, strides)
    if _traced_symbolically():
        # Padded (or, where a width is negative, cropped) in one step: the
        # torch.compile tracer proves slowly what the convolution's own
        # padding needs to know about symbolic widths.
        full = _pad(spread_delta, [(0, 0), *widths, (0, 0)])
        return _full_convolution(full, w, [(0, 0)] * rank, dilation, groups)
    return _full_convolution(spread_delta, w, widths, dilation, groups)


def input_delta_by_phases(
    delta,
    w,
    spatial_shape: Sequence[int],
    strides: Sequence[int],
    pairs: Pairs,
    groups: int = 1,
):
    """``input_delta`` of a strided, undilated layer, one phase at a time,
    without the zeros of ``spread``.

    Split each axis of the padded input into its ``s`` phases, the positions
    ``u = m·s + r``. Output ``p`` reads position ``u`` through tap ``k`` when
    ``p·s + k = u``, so the taps that reach phase ``r`` are ``k = j·s + r``,
    from the outputs ``p = m - j``::

        delta_prev[m·s + r] = Σ_j delta[m - j] · w[j·s + r]

    the full convolution of the delta with the rotated taps ``w[r::s]``: the
    stride-1 rule, once per phase, on that phase's own taps. No product is
    spent on an inserted zero, and no sum gains a term (a NaN delta times a
    zero tap stays out of them). ``interleave`` puts the phases back in
    place, and the forward padding is cropped off.

    Every phase is computed over the same positions ``m`` in ``[lo, hi)``:
    exactly those of the input when the padding is known as the graph is
    built (then, with ``before`` and the input's end multiples of ``s``,
    nothing is cropped), else ``[0, L + ceil(K / s))``, which reaches past
    the padded input's end, so the phases stay static while the padding is
    known only when the graph runs.
    """
    rank = len(strides)
    kernel_size = w.shape[:rank]
    lengths = ops.shape(delta)[1 : rank + 1]
    ranges = []
    for size, s, k, length, (before, _) in zip(
        spatial_shape, strides, kernel_size, lengths, pairs
    ):
        if isinstance(before, int) and isinstance(size, int):
            ranges.append((before // s, -(-(before + size) // s)))
        else:
            ranges.append((0, length + -(-k // s)))
    phases = []
    for phase in itertools.product(*(range(s) for s in strides)):
        w_phase = w[(*(slice(r, None, s) for r, s in zip(phase, strides)),)]
        taps = w_phase.shape[:rank]
        if 0 in taps:
            # No tap reaches this phase (a kernel shorter than its stride).
            shape = (
                ops.shape(delta)[0],
                *(hi - lo for lo, hi in ranges),
                groups * w.shape[-2],
            )
            phases.append(ops.zeros(shape, dtype=delta.dtype))
            continue
        # Output m of the full convolution (delta padded with t - 1 zeros)
        # is m - (t - 1) + lo here.
        widths = [
            (t - 1 - lo, hi - length)
            for t, (lo, hi), length in zip(taps, ranges, lengths)
        ]
        phases.append(
            _full_convolution(delta, w_phase, widths, (1,) * rank, groups)
        )
    merged = interleave(phases, strides)
    for axis in range(rank):
        offset = pairs[axis][0] - ranges[axis][0] * strides[axis]
        merged = _window(merged, axis + 1, offset, spatial_shape[axis])
    return merged


def _full_convolution(delta, w, widths, dilation, groups):
    """``(delta * rot180(w))`` with ``widths`` zeros around the delta: the
    convolution pads as it reads, and a negative width (forward padding
    wider than the kernel's span: outputs that saw only zeros) crops."""
    rank = len(dilation)
    return conv(
        _crop_negative(delta, widths),
        rot180(w, groups),
        strides=(1,) * rank,
        dilation=dilation,
        pairs=_added_zeros(widths),
        groups=groups,
    )


def interleave(phases: list, strides: Sequence[int]):
    """Put phases back in place: ``phases`` lists, in ``itertools.product``
    order of ``q``, the tensors ``(N, *M, C)`` holding positions
    ``m·s + q``; the result is ``(N, *(M·s), C)``.

    One axis at a time, last first: each run of ``s`` consecutive phases
    differs only in that axis's phase, and stacking them behind that axis
    and merging the two axes interleaves them. The list is emptied as the
    phases are merged, so that (in eager mode) each is freed once copied:
    the phases and the result never all exist at once.
    """
    rank = len(strides)
    for axis in reversed(range(rank)):
        s = strides[axis]
        merged = []
        while phases:
            run = phases[:s]
            del phases[:s]
            n, *sizes, c = ops.shape(run[0])
            sizes[axis] = sizes[axis] * s
            merged.append(
                ops.reshape(ops.stack(run, axis=axis + 2), (n, *sizes, c))
            )
            del run
        phases.extend(merged)
        del merged
    return phases.pop()


def _splits_into_phases(strides, dilation) -> bool:
    """Whether the phase split applies: a strided layer, undilated (Keras
    refuses strides and dilation together; ``conv`` takes them and keeps
    the textbook rule), and not traced by ``torch.compile`` (see
    ``_traced_symbolically``)."""
    return (
        any(s > 1 for s in strides)
        and all(d == 1 for d in dilation)
        and not _traced_symbolically()
    )


def _traced_symbolically() -> bool:
    """Whether sizes may be symbolic ints (``torch.compile``, see
    ``_backend.traced_by_torch_compile``). The rules then take their
    textbook form: zeros inserted for strides, one convolution for the
    kernel gradient, padding written out; the tracer handles those fast.
    """
    return _backend.traced_by_torch_compile()


def kernel_gradient(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs: Pairs,
    dilation: Sequence[int],
    groups: int = 1,
):
    """``dC/dw[k, i, o] = Σ_{n, p} a_prev[n, p·stride + k·dilation, i]
    · delta[n, p, o]``: the valid correlation of the padded input with the
    delta.

    Written as one convolution, the delta is the sliding window: the batch
    axis becomes the axis summed over (the "channels") and the input's
    channels become the independent rows (the "batch"). The delta taps are
    ``stride`` apart on the input, and the result is sampled every
    ``dilation`` positions, so the convolution runs with dilation ``stride``
    and stride ``dilation``. Groups pair each group's inputs with that
    group's deltas.

    A strided, undilated axis is first split into its ``s`` phases, which
    drops the dilation of the delta: tap ``k = j·s + r`` reads padded
    position ``(p + j)·s + r``, which is position ``p + j`` of phase ``r``,
    so every phase is a stride-1 correlation with the delta, over its own
    ``ceil((K - r) / s)`` taps: the same products as the strided rule, no
    more. ``_phase_rows`` lays the phases side by side in the rows, each
    phase's rows are correlated with the delta, and ``_taps_from_phases``
    puts tap ``(j, r)`` back at ``j·s + r``.
    """
    x, delta = _at_least_one_sample(x, delta)
    delta = _at_least_one_position(delta)
    rank = len(strides)
    if (
        all(k == 1 for k in kernel_size)
        and all(s == 1 for s in strides)
        and all(_is_zero(v) for pair in pairs for v in pair)
    ):
        return _kernel_gradient_pointwise(x, delta, groups)
    if (
        groups > 1
        and x.shape[-1] == groups
        and all(s == 1 for s in strides)
        and _backend.sums_depthwise_taps()
        and not _traced_symbolically()
    ):
        return _kernel_gradient_depthwise(
            x, delta, kernel_size, pairs, dilation
        )
    if _traced_symbolically():
        return _kernel_gradient_one_convolution(
            x, delta, kernel_size, strides, pairs, dilation, groups
        )
    axes = [
        _kernel_gradient_axis(
            ops.shape(x)[axis + 1],
            ops.shape(delta)[axis + 1],
            kernel_size[axis],
            strides[axis],
            dilation[axis],
            pairs[axis][0],
        )
        for axis in range(rank)
    ]
    widths = [axis.x_widths for axis in axes]
    padded = _crop_negative(x, widths)
    padded = _pad(padded, [(0, 0), *_added_zeros(widths), (0, 0)])
    phases = [axis.phases for axis in axes]
    taps = [axis.taps for axis in axes]
    strides_here = [axis.conv_stride for axis in axes]
    dilation_here = [axis.conv_dilation for axis in axes]
    # Depthwise (one input channel per group), where the backend would
    # split each group into copies: every group's rows and deltas are laid
    # out as a contiguous block instead (measured, TensorFlow CPU graph,
    # 3x3 depthwise 64 channels 32x32 batch 16: train-step peak 20.5 ->
    # 16.4 MiB). With a few wide groups (groups 4) the blocks saved nothing
    # (16.1 MiB either way, once the input delta waits for the kernel
    # gradient) and no time.
    # (The window's shape is (*L, N, C_out); static, N may be None.)
    batch, *lengths, cout = delta.shape
    apart = x.shape[-1] == groups and _backend.runs_groups_apart(
        (*lengths, batch, cout), strides_here, dilation_here, groups
    )
    blocks = groups if apart else 1
    rows = _phase_rows(padded, phases, groups, blocks)
    del padded  # in eager mode, freed here rather than on return
    phase_count = math.prod(phases)
    if phase_count == 1 and _backend.pads_by_copy(rank):
        # The convolution would pad the rows by a copy, which a TensorFlow
        # graph makes as soon as the input exists, during the forward pass,
        # and keeps beside the window. Padded here once the delta exists,
        # and the window laid out after it (measured, 3D 3x3x3 16 channels
        # 16^3 batch 4: train-step peak 4.51 -> 4.09 MiB).
        reads = [axis.reads(k) for axis, k in zip(axes, kernel_size)]
        rows = _pad(
            _crop_negative(_backend.after(rows, delta), reads),
            [(0, 0), *_added_zeros(reads), (0, 0)],
        )
        axes = [
            axis._replace(read_before=0, read_after=-k)
            for axis, k in zip(axes, kernel_size)
        ]
        delta = _backend.after(delta, rows)
    window = _delta_window(delta, blocks)
    if phase_count > 1:
        window = _backend.shared_filter(window)
    per_phase = rows.shape[0] // (blocks * phase_count)
    per_block = rows.shape[0] // blocks
    # (rows, window, groups) of each convolution a phase takes: one grouped
    # convolution, or one per group on leading-axis slices (views).
    operands = (
        [
            (rows[j * per_block : (j + 1) * per_block], window[j], 1)
            for j in range(blocks)
        ]
        if apart
        else [(rows, window, groups)]
    )
    del rows, window

    results = []
    for index, phase in enumerate(itertools.product(*map(range, phases))):
        counts = [
            -(-(k - r) // s) for k, r, s in zip(kernel_size, phase, phases)
        ]
        if 0 in counts:
            # A kernel shorter than its stride: no tap in this phase.
            shape = (per_phase, *taps, cout)
            results.append(ops.zeros(shape, dtype=x.dtype))
            continue
        reads = [axis.reads(count) for axis, count in zip(axes, counts)]
        start = index * per_phase
        grads = [
            conv(
                _crop_negative(block[start : start + per_phase], reads),
                block_window,
                strides=strides_here,
                dilation=dilation_here,
                pairs=_added_zeros(reads),
                groups=block_groups,
            )
            for block, block_window, block_groups in operands
        ]
        grad = grads[0] if len(grads) == 1 else ops.concatenate(grads, axis=-1)
        # The phase's taps, zero-padded to ``taps`` so that phases stack.
        results.append(
            _pad(
                grad,
                [(0, 0)]
                + [(0, t - count) for t, count in zip(taps, counts)]
                + [(0, 0)],
            )
        )
    del operands
    if len(results) == 1:
        # (C/g, *K, C_out) to (*K, C/g, C_out)
        grad = ops.transpose(results[0], (*range(1, rank + 1), 0, rank + 1))
    else:
        grad = _taps_from_phases(ops.concatenate(results, axis=0), phases, taps)
    for axis in range(rank):
        grad = _crop(grad, axis, kernel_size[axis])
    return grad


def _kernel_gradient_depthwise(x, delta, kernel_size, pairs, dilation):
    """``kernel_gradient`` of a depthwise kernel (one input channel per
    group, ``m`` filters each) at stride 1: each group's correlation has a
    single input channel, so tap ``k``'s gradient is ``dC/dw[k, 0, c·m + j]
    = Σ_{n, p} a_prev[n, p + k·dilation, c] · delta[n, p, c·m + j]``, the
    products of one window of the padded input with the delta, summed. As a
    convolution it would be a grouped one with the delta as a filter as
    large as the image (see ``_backend.sums_depthwise_taps``). (JAX and
    torch sum float16 and bfloat16 in float32; a test checks it.)
    """
    rank = len(kernel_size)
    x, delta = ops.convert_to_tensor(x), ops.convert_to_tensor(delta)
    n, *lengths, cout = ops.shape(delta)
    cin = x.shape[-1]
    padded = _pad(x, [(0, 0), *pairs, (0, 0)])
    multiplier = cout // cin
    if multiplier > 1:
        # (N, *L, C, m): each input channel's m deltas.
        delta = ops.reshape(delta, (n, *lengths, cin, multiplier))
    axes = tuple(range(rank + 1))
    taps = []
    for tap in itertools.product(*map(range, kernel_size)):
        # One slice for all axes: a backend may copy each slice it takes.
        window = padded[
            (
                slice(None),
                *(
                    slice(k * d, k * d + length)
                    for k, d, length in zip(tap, dilation, lengths)
                ),
            )
        ]
        if multiplier > 1:
            window = ops.expand_dims(window, -1)
        products = window * delta
        taps.append(ops.sum(products, axis=axes))
    return ops.reshape(ops.stack(taps), (*kernel_size, 1, cout))


def _kernel_gradient_pointwise(x, delta, groups):
    """``kernel_gradient`` of a 1x1 kernel at stride 1: its one tap's window
    is the whole input, so ``dC/dw[0, i, o] = Σ_{n, p} a_prev[n, p, i] ·
    delta[n, p, o]`` is one matrix product over the positions ``(n, p)``
    (per group), with no layout change of either operand."""
    rank = len(x.shape) - 2
    cin, cout = x.shape[-1], delta.shape[-1]
    if groups == 1:
        grad = ops.einsum(
            "mi,mo->io",
            ops.reshape(x, (-1, cin)),
            ops.reshape(delta, (-1, cout)),
        )
    else:
        grad = ops.einsum(
            "mgi,mgo->igo",
            ops.reshape(x, (-1, groups, cin // groups)),
            ops.reshape(delta, (-1, groups, cout // groups)),
        )
    return ops.reshape(grad, (*(1,) * rank, cin // groups, cout))


def _kernel_gradient_one_convolution(
    x, delta, kernel_size, strides, pairs, dilation, groups
):
    """``kernel_gradient`` as one convolution, without phases, with the
    input padded by a copy: the form the torch.compile tracer handles fast
    when sizes are symbolic."""
    rank = len(strides)
    padded = _pad(x, [(0, 0), *pairs, (0, 0)])
    for axis in range(rank):
        span = effective_kernel_size(kernel_size[axis], dilation[axis])
        reached = (ops.shape(delta)[axis + 1] - 1) * strides[axis] + span
        padded = _crop(padded, axis + 1, reached)
    rows = _phase_rows(padded, (1,) * rank, groups)
    window = _delta_window(delta, 1)
    grad = conv(rows, window, strides=dilation, dilation=strides, groups=groups)
    return ops.transpose(grad, (*range(1, rank + 1), 0, rank + 1))


class _KernelGradientAxis(NamedTuple):
    """How ``kernel_gradient`` reads one spatial axis of the input.

    ``phases``: how many phases the axis is split into (its stride, or 1);
    ``taps``: taps per phase (the most any phase has); ``conv_stride`` and
    ``conv_dilation``: the convolution's on this axis; ``x_widths``: the
    zeros added to the input before it is split (the forward padding, where
    the convolution does not add it as it reads); ``reads(count)``.
    """

    phases: int
    taps: int
    conv_stride: int
    conv_dilation: int
    x_widths: tuple
    read_before: object
    read_after: object

    def reads(self, count):
        """The ``(before, after)`` zeros the convolution adds to a phase's
        rows to compute ``count`` taps; a negative ``after`` cuts positions
        off instead."""
        return self.read_before, self.read_after + count


def _kernel_gradient_axis(size, length, k, s, d, before):
    """The ``_KernelGradientAxis`` of an axis of ``size`` input positions and
    ``length`` delta positions, kernel ``k``, stride ``s``, dilation ``d``,
    ``before`` zeros of forward padding. The padded input is used up to the
    last position a tap reads; positions past it are cut off."""
    if s == 1 or d > 1:
        # One phase: the delta taps are s apart and the result is sampled
        # every d, all k taps at once.
        used = (length - 1) * s + effective_kernel_size(k, d)
        return _KernelGradientAxis(
            1, k, d, s, (0, 0), before, used - before - size - k
        )
    taps = -(-k // s)
    if (
        isinstance(size, int)
        and isinstance(before, int)
        and size % s == 0
        and before % s == 0
    ):
        # Phase r of the padded input is phase r of the input, shifted by
        # before / s: the convolution pads each phase as it reads.
        shift = before // s
        return _KernelGradientAxis(
            s, taps, 1, 1, (0, 0), shift, length - 1 - shift - size // s
        )
    # Otherwise the input is padded, as far as the phases reach, and split.
    used = (length + taps - 1) * s
    return _KernelGradientAxis(
        s, taps, 1, 1, (before, used - before - size), 0, -taps
    )


def _phase_rows(x, phases: Sequence[int], groups: int, blocks: int = 1):
    """The kernel gradient's rows: ``(N, *(M·phases), C)`` to
    ``(∏phases · C/g, *M, g·N)``, phase ``r`` of position ``m`` being
    position ``m·phases + r``; the phases and the input's channels become
    the batch, its batch the channels, grouped as the kernel is.

    ``blocks = groups`` moves the groups from the channels to the front:
    ``(g · ∏phases · C/g, *M, N)``, each group's rows one block."""
    rank = len(phases)
    n, *sizes, c = ops.shape(x)
    if blocks == 1 and all(s == 1 for s in phases):
        # No phases: the channels to the front, the batch to the back.
        by_group = ops.reshape(x, (n, *sizes, groups, c // groups))
        rows = ops.transpose(
            by_group, (rank + 2, *range(1, rank + 1), rank + 1, 0)
        )
        return ops.reshape(rows, (c // groups, *sizes, groups * n))
    counts = [size // s for size, s in zip(sizes, phases)]
    split = ops.reshape(
        x,
        (
            n,
            *(v for m, s in zip(counts, phases) for v in (m, s)),
            groups,
            c // groups,
        ),
    )
    phase_axes = range(2, 2 * rank + 1, 2)
    position_axes = range(1, 2 * rank, 2)
    group_axis, channel_axis = 2 * rank + 1, 2 * rank + 2
    rows_per_block = math.prod(phases) * (c // groups)
    if blocks == 1:
        # (N, M0, s0, M1, s1, ..., g, C/g) to
        # (s0, s1, ..., C/g, M0, M1, ..., g, N)
        order = (*phase_axes, channel_axis, *position_axes, group_axis, 0)
        shape = (rows_per_block, *counts, groups * n)
    else:
        # ... to (g, s0, s1, ..., C/g, M0, M1, ..., N)
        order = (group_axis, *phase_axes, channel_axis, *position_axes, 0)
        shape = (groups * rows_per_block, *counts, n)
    return ops.reshape(ops.transpose(split, order), shape)


def _delta_window(delta, blocks: int):
    """The kernel gradient's sliding window: the delta ``(N, *L, C_out)``
    as ``(*L, N, C_out)``, or with ``blocks = groups`` as ``(g, *L, N,
    C_out/g)``, each group's deltas one block."""
    rank = len(delta.shape) - 2
    if blocks == 1:
        return ops.transpose(delta, (*range(1, rank + 1), 0, rank + 1))
    n, *lengths, cout = ops.shape(delta)
    split = ops.reshape(delta, (n, *lengths, blocks, cout // blocks))
    return ops.transpose(split, (rank + 1, *range(1, rank + 1), 0, rank + 2))


def _taps_from_phases(grad, phases: Sequence[int], taps: Sequence[int]):
    """The kernel gradient's convolution result, ``(∏phases · C/g, *T,
    C_out)``, as a kernel ``(*(T·phases), C/g, C_out)``: tap ``j`` of phase
    ``r`` goes to ``j·phases + r``."""
    rank = len(phases)
    cout = grad.shape[-1]
    split = ops.reshape(grad, (*phases, -1, *taps, cout))
    # (s0, s1, ..., C/g, T0, T1, ..., C_out) to (T0, s0, T1, s1, ..., C/g,
    # C_out)
    order = []
    for axis in range(rank):
        order += [rank + 1 + axis, axis]
    moved = ops.transpose(split, (*order, rank, 2 * rank + 1))
    return ops.reshape(
        moved, (*(t * s for t, s in zip(taps, phases)), -1, cout)
    )


def _at_least_one_sample(x, delta):
    """``x`` and ``delta`` with one zero sample added if the batch is empty.

    The kernel gradient of an empty batch is a sum of no terms, zero; but as
    a convolution the batch is the channel axis, and no backend convolves
    zero channels. A zero sample adds nothing to the sum. The batch size may
    only be known when a graph runs (tf.distribute hands a replica an empty
    share of a last, partial batch), so the sample count is computed rather
    than branched on: XLA compiles both sides of a branch, and compiling the
    empty side crashes it.
    """
    batch = ops.shape(x)[0]
    if isinstance(batch, int) and batch > 0:
        return x, delta
    widths = [(0, _at_least_zero(1 - batch))] + [(0, 0)] * (len(x.shape) - 1)
    return _pad(x, widths), _pad(delta, widths)


def _at_least_one_position(delta):
    """``delta`` with one zero position added at the end of every spatial
    axis that is empty.

    The kernel gradient of an empty output is again a sum of no terms; but
    the delta is the convolution's filter, and no backend convolves with an
    empty filter. The added position reads input positions past the end,
    which the kernel gradient pads with zeros as for any delta; and it adds
    nothing. An output can only be empty where the layer could not check the
    sizes (they are known only when a graph runs), so the widths are
    computed, as in ``_at_least_one_sample``.
    """
    lengths = ops.shape(delta)[1:-1]
    if all(isinstance(length, int) and length > 0 for length in lengths):
        return delta
    widths = [(0, _at_least_zero(1 - length)) for length in lengths]
    return _pad(delta, [(0, 0), *widths, (0, 0)])


def bias_gradient(delta):
    """``dC/db = Σ delta`` over the batch and every spatial position.

    A float16 or bfloat16 delta is summed in float32: the sum has a term for
    every output position of every sample, and partial sums rounded to a
    half type's 11 or 8 bits lose its small terms.
    """
    axes = tuple(range(len(delta.shape) - 1))
    dtype = keras.backend.standardize_dtype(delta.dtype)
    if dtype in ("float16", "bfloat16"):
        return ops.cast(ops.sum(ops.cast(delta, "float32"), axis=axes), dtype)
    return ops.sum(delta, axis=axes)


def conv(
    x,
    w,
    b=None,
    *,
    strides: Sequence[int],
    dilation: Sequence[int],
    pairs: Pairs | None = None,
    groups: int = 1,
):
    """``z = pad(x, pairs) * w + b``, differentiated by the derived rules.

    ``strides``, ``dilation`` and ``pairs`` (default: no padding) have one
    entry per spatial axis. Returns ``(N, *L, C_out)``.
    """
    x, w = ops.convert_to_tensor(x), ops.convert_to_tensor(w)
    b = None if b is None else ops.convert_to_tensor(b)
    rank = len(strides)
    strides, dilation = tuple(strides), tuple(dilation)
    pairs = tuple(pairs) if pairs is not None else ((0, 0),) * rank
    spatial_shape = tuple(ops.shape(x)[1:-1])
    kernel_size = tuple(w.shape[:rank])

    def forward(x, w, *bias):
        z = _backend.correlate(x, w, strides, dilation, groups, pairs)
        if bias:
            z = _backend.add_bias(z, bias[0])
        return z

    def backward(delta, x, w, *bias, needed):
        # Only the gradients something reads (see _backend.custom_gradient):
        # a first layer needs no input delta.
        dx = dw = db = None
        # The kernel gradient first: in eager mode the input delta (as large
        # as the input) then does not exist while the kernel gradient's own
        # temporaries do.
        if needed[1]:
            dw = kernel_gradient(
                x, delta, kernel_size, strides, pairs, dilation, groups
            )
        if needed[0]:
            # (In a TensorFlow graph, too: it would otherwise run both at
            # once.)
            dx = input_delta(
                delta if dw is None else _backend.after(delta, dw),
                w,
                spatial_shape,
                strides,
                pairs,
                dilation,
                groups,
            )
        if not bias:
            return dx, dw
        if needed[2]:
            db = bias_gradient(delta)
        return dx, dw, db

    args = (x, w) if b is None else (x, w, b)
    return _backend.custom_gradient(forward, backward)(*args)


def _at_least_zero(value):
    # A size is an int, a tensor (TensorFlow, unknown until the graph runs)
    # or a symbolic int (torch.compile with dynamic shapes), which compares
    # like an int and must stay one.
    if ops.is_tensor(value):
        return ops.maximum(value, 0)
    return max(value, 0)


def _is_zero(value) -> bool:
    return isinstance(value, int) and value == 0


def _pad(x, widths):
    if all(_is_zero(v) for pair in widths for v in pair):
        return x
    return _backend.pad(x, widths)


def _added_zeros(widths):
    """The zeros that ``(before, after)`` padding widths add; a negative
    width adds none (``_crop_negative`` cuts those positions off)."""
    return [(_at_least_zero(lo), _at_least_zero(hi)) for lo, hi in widths]


def _crop_negative(x, widths):
    """``x`` with ``-width`` entries cut from each spatial side whose padding
    width is negative."""
    for axis, (lo, hi) in enumerate(widths, start=1):
        cut_lo, cut_hi = _at_least_zero(-lo), _at_least_zero(-hi)
        if _is_zero(cut_lo) and _is_zero(cut_hi):
            continue
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(cut_lo, ops.shape(x)[axis] - cut_hi)
        x = x[tuple(index)]
    return x


def _crop(x, axis, length):
    """Keep the first ``length`` entries of ``axis``."""
    return _window(x, axis, 0, length)


def _window(x, axis, start, length):
    """Keep the entries ``start`` to ``start + length`` of ``axis``."""
    if _is_zero(start) and isinstance(length, int) and x.shape[axis] == length:
        return x
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, start + length)
    return x[tuple(index)]
