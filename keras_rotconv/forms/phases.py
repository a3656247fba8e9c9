"""The phase split: a strided axis as ``s`` stride-1 axes.

Split into its ``s`` phases, the positions ``m·s + r``, a strided axis is a
stride-1 axis per phase. Both rules then compute the same sums as
``keras_rotconv.rules`` without a product with an inserted zero
(``input_delta_by_phases``) or a dilated window (``kernel_gradient_by_phases``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

from keras_rotconv import _backend, rules
from keras_rotconv import ops as rotconv_ops
from keras_rotconv._backend import ops  # keras.ops; on torch, see there
from keras_rotconv._shapes import (
    added_zeros,
    crop,
    crop_negative,
    pad,
    pad_spatial,
    window,
)


def applies_to_input_delta(strides, dilation) -> bool:
    """Whether ``input_delta_by_phases`` applies: a strided layer, undilated
    (Keras refuses strides and dilation together; ``ops.conv`` takes them
    and keeps the textbook rule)."""
    return any(s > 1 for s in strides) and all(d == 1 for d in dilation)


def applies_to_kernel_gradient(x, delta, strides, dilation, groups) -> bool:
    """Whether ``kernel_gradient_by_phases`` has something to add to
    ``rules.kernel_gradient``: an axis strided and undilated, to split into
    phases, or a backend layout of the rows (``_backend.pads_by_copy``,
    depthwise group blocks: see ``_padded_after_delta`` and ``_blocks``)."""
    if any(s > 1 and d == 1 for s, d in zip(strides, dilation)):
        return True
    conv_args = (dilation, strides)  # one phase: stride and dilation swap
    return (
        _backend.pads_by_copy(len(strides))
        or _blocks(x, delta, conv_args, groups) > 1
    )


def input_delta_by_phases(
    delta,
    w,
    spatial_shape: Sequence[int],
    strides: Sequence[int],
    pairs,
    groups: int = 1,
):
    """Equals ``rules.input_delta`` of a strided, undilated layer, without
    the zeros of ``spread``.

    Output ``p`` reads padded input position ``u`` through tap ``k`` when
    ``p·s + k = u``, so the taps that reach phase ``r`` (``u = m·s + r``)
    are ``k = j·s + r``, from the outputs ``p = m - j``::

        delta_prev[m·s + r] = Σ_j delta[m - j] · w[j·s + r]

    the full convolution of the delta with the rotated taps ``w[r::s]``: the
    stride-1 rule, once per phase, on that phase's own taps. The sums are
    the textbook ones less the terms with an inserted zero (so a NaN delta
    times a zero tap stays out of them). ``interleave`` puts the phases back
    in place, and the forward padding is cropped off.
    """
    rank = len(strides)
    lengths = ops.shape(delta)[1 : rank + 1]
    ranges = _phase_ranges(
        spatial_shape, strides, w.shape[:rank], pairs, lengths
    )
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
            rules.full_convolution(delta, w_phase, widths, (1,) * rank, groups)
        )
    merged = interleave(phases, strides)
    for axis in range(rank):
        offset = pairs[axis][0] - ranges[axis][0] * strides[axis]
        merged = window(merged, axis + 1, offset, spatial_shape[axis])
    return merged


def _phase_ranges(spatial_shape, strides, kernel_size, pairs, lengths):
    """The positions ``m`` in ``[lo, hi)`` every phase is computed over:
    exactly those of the input where the padding is known as the graph is
    built (then, with ``before`` and the input's end multiples of ``s``,
    nothing is cropped); else ``[0, L + ceil(K / s))``, which reaches past
    the padded input's end, so that the phases stay static while the
    padding is known only when the graph runs."""
    ranges = []
    for size, s, k, (before, _), length in zip(
        spatial_shape, strides, kernel_size, pairs, lengths
    ):
        if isinstance(before, int) and isinstance(size, int):
            ranges.append((before // s, -(-(before + size) // s)))
        else:
            ranges.append((0, length + -(-k // s)))
    return ranges


def interleave(phases: list, strides: Sequence[int]):
    """Put phases back in place: ``phases`` lists, in ``itertools.product``
    order of ``q``, the tensors ``(N, *M, C)`` holding positions
    ``m·s + q``; the result is ``(N, *(M·s), C)``.

    One axis at a time, last first: each run of ``s`` consecutive phases
    differs only in that axis's phase, and stacking them behind that axis
    and merging the two axes interleaves them. The list is emptied as the
    phases are merged, so that (in eager mode) each is freed once copied:
    the phases and the result never all exist at once.

    A backend that can write each phase into its place in one buffer does
    so (``_backend.interleave_in_place``): one copy, not one per axis.
    """
    if _backend.interleaves_in_place(phases):
        return _backend.interleave_in_place(phases, strides)
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


class _KernelGradientAxis(NamedTuple):
    """How ``kernel_gradient_by_phases`` reads one spatial axis of the input.

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
        # One phase, as in rules.kernel_gradient: the delta taps are s
        # apart and the result is sampled every d, all k taps at once.
        used = (length - 1) * s + (k - 1) * d + 1
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


def kernel_gradient_by_phases(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs,
    dilation: Sequence[int],
    groups: int = 1,
):
    """Equals ``rules.kernel_gradient``, with each strided, undilated axis
    split into its ``s`` phases, which drops the dilation of the window.

    Tap ``k = j·s + r`` reads padded position ``(p + j)·s + r``, position
    ``p + j`` of phase ``r``, so every phase is a stride-1 correlation with
    the delta over its own ``ceil((K - r) / s)`` taps: the same products as
    the strided rule, no more. ``_phase_rows`` lays the phases side by side
    in the rows, each phase's rows are correlated with the delta, and
    ``_taps_from_phases`` puts tap ``(j, r)`` back at ``j·s + r``. With no
    phases to split it is ``rules.kernel_gradient`` in the backend's layout
    (see ``applies_to_kernel_gradient``).
    """
    rank = len(strides)
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
    padded = pad_spatial(x, widths)
    conv_args = (
        [axis.conv_stride for axis in axes],
        [axis.conv_dilation for axis in axes],
    )
    blocks = _blocks(x, delta, conv_args, groups)
    rows = _phase_rows(padded, [axis.phases for axis in axes], groups, blocks)
    del padded  # in eager mode, freed here rather than on return
    if all(axis.phases == 1 for axis in axes) and _backend.pads_by_copy(rank):
        rows, delta, axes = _padded_after_delta(rows, delta, axes, kernel_size)
    window_ = _delta_window(delta, blocks)
    if any(axis.phases > 1 for axis in axes):
        window_ = _backend.shared_filter(window_)
    results = _correlate_phases(
        rows, window_, axes, kernel_size, conv_args, groups, blocks
    )
    del rows, window_
    return _taps_from_phases(results, axes, kernel_size)


def _blocks(x, delta, conv_args, groups) -> int:
    """``groups`` where a depthwise kernel gradient lays every group's rows
    and deltas out as a contiguous block, for a backend that would split
    each group into copies (``_backend.runs_groups_apart``), else 1."""
    # (The window's shape is (*L, N, C_out); static, N may be None.)
    batch, *lengths, cout = delta.shape
    apart = x.shape[-1] == groups and _backend.runs_groups_apart(
        (*lengths, batch, cout), *conv_args, groups
    )
    return groups if apart else 1


def _padded_after_delta(rows, delta, axes, kernel_size):
    """``rows`` padded by a copy once the delta exists, and the delta
    ordered after it, for a backend whose convolution would pad by a copy
    (``_backend.pads_by_copy``): a TensorFlow graph would make that copy as
    soon as the input exists, during the forward pass, and keep it beside
    the window (see benchmarks/results/README.md, "Measured figures")."""
    reads = [axis.reads(k) for axis, k in zip(axes, kernel_size)]
    rows = pad_spatial(_backend.after(rows, delta), reads)
    axes = [
        axis._replace(read_before=0, read_after=-k)
        for axis, k in zip(axes, kernel_size)
    ]
    return rows, _backend.after(delta, rows), axes


def _correlate_phases(
    rows, window_, axes, kernel_size, conv_args, groups, blocks
):
    """Each phase's rows correlated with the delta: one grouped convolution
    per phase, or (``blocks = groups``) one per group on leading-axis slices
    (views). Each result is zero-padded to the most taps of any phase, so
    that the phases stack."""
    phases = [axis.phases for axis in axes]
    taps = [axis.taps for axis in axes]
    per_phase = rows.shape[0] // (blocks * math.prod(phases))
    per_block = rows.shape[0] // blocks
    cout = window_.shape[-1] * blocks
    if blocks > 1:
        operands = [
            (rows[j * per_block : (j + 1) * per_block], window_[j], 1)
            for j in range(blocks)
        ]
    else:
        operands = [(rows, window_, groups)]
    del rows, window_
    results = []
    for index, phase in enumerate(itertools.product(*map(range, phases))):
        counts = [
            -(-(k - r) // s) for k, r, s in zip(kernel_size, phase, phases)
        ]
        if 0 in counts:
            # A kernel shorter than its stride: no tap in this phase.
            shape = (per_phase, *taps, cout)
            results.append(ops.zeros(shape, dtype=operands[0][0].dtype))
            continue
        reads = [axis.reads(count) for axis, count in zip(axes, counts)]
        start = index * per_phase
        grads = [
            rotconv_ops.conv(
                crop_negative(block[start : start + per_phase], reads),
                block_window,
                strides=conv_args[0],
                dilation=conv_args[1],
                pairs=added_zeros(reads),
                groups=block_groups,
            )
            for block, block_window, block_groups in operands
        ]
        grad = grads[0] if len(grads) == 1 else ops.concatenate(grads, axis=-1)
        widths = [(0, t - count) for t, count in zip(taps, counts)]
        results.append(pad(grad, [(0, 0), *widths, (0, 0)]))
    return results


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
        # No phases: the rows of rules.kernel_gradient.
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


def _taps_from_phases(results, axes, kernel_size):
    """The phases' convolution results, each ``(C/g, *T, C_out)``, as a
    kernel ``(*K, C/g, C_out)``: tap ``j`` of phase ``r`` goes to
    ``j·phases + r``, and the taps past ``K`` (zeros) go."""
    rank = len(axes)
    if len(results) == 1:
        # (C/g, *K, C_out) to (*K, C/g, C_out)
        grad = ops.transpose(results[0], (*range(1, rank + 1), 0, rank + 1))
    else:
        grad = _interleave_taps(
            ops.concatenate(results, axis=0),
            [axis.phases for axis in axes],
            [axis.taps for axis in axes],
        )
    for axis in range(rank):
        grad = crop(grad, axis, kernel_size[axis])
    return grad


def _interleave_taps(grad, phases: Sequence[int], taps: Sequence[int]):
    """``(∏phases · C/g, *T, C_out)`` to ``(*(T·phases), C/g, C_out)``."""
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
