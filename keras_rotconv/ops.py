"""The convolution with the derived backward pass, for 1, 2 or 3 spatial axes.

``conv`` is the layer's convolution, ``z = pad(x, pairs) * w + b``, with its
gradient attached. Its backward pass calls ``input_delta``,
``kernel_gradient`` and ``bias_gradient`` below, which choose, through a
flat list of guards, the cheapest form of each rule that applies: a form in
``keras_rotconv.forms``, else the textbook rule in ``keras_rotconv.rules``
(where the derivation is written out, with its equations). Inside
``textbook_rules()`` the first guard sends each straight to ``rules``.

Everything here is channels-last: ``x`` is ``(N, *S, C_in)``, ``w`` is
``(*K, C_in // groups, C_out)``, ``b`` is ``(C_out,)`` and a delta is
``(N, *L, C_out)``. Padding is explicit, as one ``(before, after)`` pair per
spatial axis (see ``padding_pairs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from keras import ops

from keras_rotconv import _backend, _tuning, rules
from keras_rotconv._shapes import at_least_one_position, at_least_one_sample
from keras_rotconv._shapes import at_least_zero as _at_least_zero
from keras_rotconv.forms import layouts, phases, sums
from keras_rotconv.rules import rot180, spread

__all__ = [
    "bias_gradient",
    "conv",
    "effective_kernel_size",
    "input_delta",
    "kernel_gradient",
    "output_size",
    "padding_pairs",
    "rot180",
    "spread",
    "textbook_rules",
]

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


class _Mode:
    """Whether the backward pass runs the textbook rules only. One setting
    for the process, not per thread: tf.distribute runs each replica's
    steps in threads of its own."""

    textbook = False


_MODE = _Mode()


@contextlib.contextmanager
def textbook_rules() -> Iterator[None]:
    """Inside the block, every RotConv layer's backward pass runs the
    functions of ``keras_rotconv.rules`` only: zeros spread for strides, the
    kernel gradient as one convolution, no form of ``keras_rotconv.forms``.

    A layer called inside the block keeps the textbook backward pass for
    that call, wherever its gradient is taken; a gradient taken inside the
    block is textbook too. A traced function (``tf.function``, ``jax.jit``,
    ``torch.compile``, a Keras train step) fixes the choice when it is
    traced: trace it inside the block. The values are the same either way,
    to rounding.
    """
    saved = _MODE.textbook
    _MODE.textbook = True
    try:
        yield
    finally:
        _MODE.textbook = saved


def _textbook() -> bool:
    """Whether to skip the cheaper forms: inside ``textbook_rules()``."""
    return _MODE.textbook


def input_delta(
    delta,
    w,
    spatial_shape: Sequence[int],
    strides: Sequence[int],
    pairs: Pairs,
    dilation: Sequence[int],
    groups: int = 1,
):
    """``delta_prev = (spread(delta) * rot180(w))_full``, cropped to the
    input (``rules.input_delta``), in its cheapest form."""
    args = (delta, w, spatial_shape, strides, pairs, dilation, groups)
    if _textbook():
        return rules.input_delta(*args)
    if _backend.traced_by_torch_compile():
        shape = (delta.shape[0], *spatial_shape, w.shape[-2] * groups)
        return _backend.untraced(_cheapest_input_delta, shape, *args)
    return _cheapest_input_delta(*args)


def _cheapest_input_delta(
    delta, w, spatial_shape, strides, pairs, dilation, groups
):
    if phases.applies_to_input_delta(strides, dilation):
        return phases.input_delta_by_phases(
            delta, w, spatial_shape, strides, pairs, groups
        )
    return rules.input_delta(
        delta, w, spatial_shape, strides, pairs, dilation, groups
    )


def kernel_gradient(
    x,
    delta,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pairs: Pairs,
    dilation: Sequence[int],
    groups: int = 1,
):
    """``dC/dw = a_prev ⋆ delta`` (``rules.kernel_gradient``), in its
    cheapest form.

    An empty batch or output gets one zero sample or position first (see
    ``_shapes.at_least_one_sample``): the sums are zero, but no backend
    convolves with zero channels or an empty filter.
    """
    x, delta = at_least_one_sample(x, delta)
    delta = at_least_one_position(delta)
    args = (x, delta, kernel_size, strides, pairs, dilation, groups)
    if _textbook():
        return rules.kernel_gradient(*args)
    if _backend.traced_by_torch_compile():
        shape = (*kernel_size, x.shape[-1] // groups, delta.shape[-1])
        return _backend.untraced(_cheapest_kernel_gradient, shape, *args)
    return _cheapest_kernel_gradient(*args)


def _cheapest_kernel_gradient(
    x, delta, kernel_size, strides, pairs, dilation, groups
):
    args = (x, delta, kernel_size, strides, pairs, dilation, groups)
    forms = _kernel_gradient_forms(*args)
    shapes = (
        _tuning.shapes_to_time(x, delta, kernel_size)
        if len(forms) > 1
        else None
    )
    if shapes is None:
        return next(iter(forms.values()))(x, delta)
    key = (
        "kernel_gradient",
        str(x.dtype),
        _backend.device_kind(x),
        tuple(x.shape),
        tuple(delta.shape),
        *args[2:],
    )
    return _tuning.fastest(key, forms, shapes, x.dtype)(x, delta)


def _kernel_gradient_forms(
    x, delta, kernel_size, strides, pairs, dilation, groups=1
) -> dict:
    """The forms of the kernel gradient that apply to these shapes, name to
    ``form(x, delta)``, the one taken untimed first. ``kernel_gradient``
    times them where there is more than one (``keras_rotconv._tuning``);
    ``benchmarks/rule_timings.py`` times each against the built-in layer's
    gradient."""
    rest = (kernel_size, strides, pairs, dilation, groups)
    if sums.is_pointwise(kernel_size, strides, pairs):
        return {
            "one product": lambda x, delta: sums.kernel_gradient_pointwise(
                x, delta, groups
            )
        }
    if sums.is_depthwise(x, strides, groups) and _backend.sums_depthwise_taps():
        return {
            "tap sums": lambda x, delta: sums.kernel_gradient_depthwise(
                x, delta, kernel_size, pairs, dilation
            )
        }
    if phases.applies_to_kernel_gradient(x, delta, strides, dilation, groups):
        convolution = phases.kernel_gradient_by_phases
    else:
        convolution = rules.kernel_gradient
    forms = {"convolution": lambda x, delta: convolution(x, delta, *rest)}
    spatial = (*x.shape[1:-1], *delta.shape[1:-1])
    if groups > 1 or not all(isinstance(n, int) for n in spatial):
        # The other forms are for one group, and their guards read the
        # spatial sizes, which a graph may know only when it runs.
        return forms
    # One group: also matrix products of the taps' windows with the delta.
    if convolution is not rules.kernel_gradient:
        # The rule's own convolution, the delta read as a dilated window:
        # with oneDNN, and on torch, often faster than the phase split.
        forms["one convolution"] = lambda x, delta: rules.kernel_gradient(
            x, delta, *rest
        )
    if layouts.applies_to_kernel_gradient(kernel_size, groups):
        forms["convolution over channels"] = lambda x, delta: (
            layouts.kernel_gradient_over_channels(
                x, delta, kernel_size, strides, pairs, dilation
            )
        )
    if sums.is_flat(x, delta, kernel_size, strides, pairs, dilation):
        forms["tap products, flat"] = lambda x, delta: (
            sums.kernel_gradient_by_flat_taps(
                x, delta, kernel_size, pairs, dilation
            )
        )
    else:
        # (Where the flat form applies, the strided windows, each a copy,
        # are not offered: once chosen on time, a 3D step's peak memory
        # rose to 1.37 of the built-in layer's.)
        forms["tap products"] = lambda x, delta: sums.kernel_gradient_by_taps(
            x, delta, kernel_size, strides, pairs, dilation
        )
    if sums.is_narrow(x, delta, kernel_size):
        forms["tap rows"] = lambda x, delta: sums.kernel_gradient_by_rows(
            x, delta, kernel_size, strides, pairs, dilation
        )
    return forms


def bias_gradient(delta):
    """``dC/db = Σ delta`` (``rules.bias_gradient``)."""
    return rules.bias_gradient(delta)


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
    entry per spatial axis; a negative width in ``pairs`` crops that many
    entries instead. Returns ``(N, *L, C_out)``.
    """
    x, w = ops.convert_to_tensor(x), ops.convert_to_tensor(w)
    b = None if b is None else ops.convert_to_tensor(b)
    rank = len(strides)
    strides, dilation = tuple(strides), tuple(dilation)
    pairs = tuple(pairs) if pairs is not None else ((0, 0),) * rank
    spatial_shape = tuple(ops.shape(x)[1:-1])
    kernel_size = tuple(w.shape[:rank])
    textbook = _MODE.textbook

    def forward(x, w, *bias):
        z = _backend.correlate(x, w, strides, dilation, groups, pairs)
        if bias:
            z = _backend.add_bias(z, bias[0])
        return z

    def backward(delta, x, w, *bias, needed):
        # Only the gradients something reads (see _backend.custom_gradient):
        # a first layer needs no input delta.
        dx = dw = db = None
        with textbook_rules() if textbook else contextlib.nullcontext():
            # The kernel gradient first: in eager mode the input delta (as
            # large as the input) then does not exist while the kernel
            # gradient's own temporaries do; in a TensorFlow graph too, which
            # would otherwise run both at once.
            if needed[1]:
                dw = kernel_gradient(
                    x, delta, kernel_size, strides, pairs, dilation, groups
                )
            if needed[0]:
                dx = input_delta(
                    delta if dw is None else _backend.after(delta, dw),
                    w,
                    spatial_shape,
                    strides,
                    pairs,
                    dilation,
                    groups,
                )
            if bias and needed[2]:
                db = bias_gradient(delta)
        return (dx, dw, db) if bias else (dx, dw)

    args = (x, w) if b is None else (x, w, b)
    return _backend.custom_gradient(forward, backward)(*args)
