"""The backend seam on torch (see ``keras_rotconv._backend``)."""

from __future__ import annotations

import importlib
import itertools

import keras
import torch
import torch.nn.functional as F


def correlate(x, w, strides, dilation, groups, pairs):
    rank = len(strides)
    padding = 0
    if all(lo == hi for lo, hi in pairs):
        # Symmetric padding the convolution adds as it reads.
        padding = tuple(lo for lo, _ in pairs)
    else:
        x = pad(x, [(0, 0), *pairs, (0, 0)])
    channels_first = (0, rank + 1, *range(1, rank + 1))
    channels_last = (0, *range(2, rank + 2), 1)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    out = conv(
        x.permute(channels_first),
        w.permute(rank + 1, rank, *range(rank)),
        stride=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    return out.permute(channels_last)


def pad(x, widths):
    # keras.ops.pad builds a Keras Operation object on every call, a side
    # effect torch.compile refuses inside an autograd function; F.pad is the
    # same zero padding without it. F.pad lists the last axis first.
    x = keras.ops.convert_to_tensor(x)
    return F.pad(x, [v for pair in reversed(widths) for v in pair])


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else keras.ops.convert_to_tensor(x)


def _reshape(x, newshape):
    return _tensor(x).reshape(tuple(newshape))


def _transpose(x, axes=None):
    x = _tensor(x)
    return x.permute(*(range(x.ndim - 1, -1, -1) if axes is None else axes))


def _stack(xs, axis=0):
    return torch.stack([_tensor(x) for x in xs], dim=axis)


def _concatenate(xs, axis=0):
    return torch.cat([_tensor(x) for x in xs], dim=axis)


def _sum(x, axis=None, keepdims=False):
    x = _tensor(x)
    if axis is None:
        return x.sum()
    if axis == ():
        return x  # (torch sums every axis for an empty tuple)
    return x.sum(dim=axis, keepdim=keepdims)


def _expand_dims(x, axis):
    if not isinstance(axis, int):
        return keras.ops.expand_dims(x, axis)
    return _tensor(x).unsqueeze(axis)


# The keras.ops functions the rules call many times per step, straight to
# torch, for the floating-point tensors of one dtype they meet (see
# keras_rotconv._backend.ops).
DIRECT_OPS = {
    "reshape": _reshape,
    "transpose": _transpose,
    "stack": _stack,
    "concatenate": _concatenate,
    "sum": _sum,
    "expand_dims": _expand_dims,
}


def custom_gradient(forward, backward):
    def op(*tensors):
        if not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        ):
            # Autograd records nothing here, so there is no gradient to
            # customize: inference, or a backward pass that is not itself
            # differentiated.
            return forward(*tensors)
        return _TorchDerivedGradient.apply(forward, backward, *tensors)

    return op


class _TorchDerivedGradient(torch.autograd.Function):
    """The derived backward pass as a torch autograd function.

    Used directly rather than through ``keras.ops.custom_gradient``,
    whose torch version swallows exceptions raised in the forward
    function and returns NaN gradients. Defined once, at import:
    ``torch.compile`` cannot trace a class statement, so a class made
    per call would break the compiled graph at every layer.
    """

    @staticmethod
    def forward(ctx, forward, backward, *tensors):
        ctx.derived_backward = backward
        ctx.save_for_backward(*tensors)
        return forward(*tensors)

    @staticmethod
    def backward(ctx, upstream):
        grads = ctx.derived_backward(
            upstream, *ctx.saved_tensors, needed=ctx.needs_input_grad[2:]
        )
        return (None, None, *grads)


def add_bias(z, b):
    return z + b


def after(x, *earlier):
    # Eager code runs in the order it is written.
    return x


def shared_filter(w):
    # The CPU convolution reads a filter as (C_out, *K, C_in) in memory
    # next to a channels-last input, and 1D as (C_out, C_in, K).
    rank = len(w.shape) - 2
    if rank == 1:
        memory = w.permute(2, 1, 0).contiguous()
        return memory.permute(2, 1, 0)
    memory = w.permute(rank + 1, *range(rank), rank).contiguous()
    return memory.permute(*range(1, rank + 1), rank + 1, 0)


def runs_groups_apart(w_shape, strides, dilation, groups) -> bool:
    return False


def sums_depthwise_taps() -> bool:
    # A grouped convolution whose filter (the delta) is as large as the
    # image runs slowly.
    return True


def summed_products(windows, delta, leading):
    delta, windows = _tensor(delta), [_tensor(w) for w in windows]
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (delta, *windows)
    ):
        # Differentiated (a gradient of the gradient): autograd records
        # no writes into a buffer (out=). Imported here: the seam's
        # package imports this module.
        from keras_rotconv._backend import _products_summed_apart

        return _products_summed_apart(windows, delta, leading)
    # One buffer for every window's products: a fresh temporary as large
    # as the delta would take its page faults again each time.
    buffer = torch.empty(
        torch.broadcast_shapes(windows[0].shape, delta.shape),
        dtype=torch.result_type(windows[0], delta),
        device=delta.device,
    )
    dims = tuple(range(leading))
    sums = []
    for window in windows:
        torch.mul(window, delta, out=buffer)
        sums.append(buffer.sum(dim=dims))
    return sums


def interleaves_in_place(phases) -> bool:
    # Autograd would record each write into the buffer; where the phases
    # are differentiated (a gradient of the gradient), they are stacked.
    return not (
        torch.is_grad_enabled()
        and any(_tensor(p).requires_grad for p in phases)
    )


def interleave_in_place(phases, strides):
    first = _tensor(phases[0])
    n, *sizes, c = first.shape
    # (N, M0, s0, M1, s1, ..., C): phase q's entry m at (m0, q0, m1, q1, ...).
    split = [v for m, s in zip(sizes, strides) for v in (m, s)]
    result = first.new_empty((n, *split, c))
    for phase in itertools.product(*(range(s) for s in strides)):
        place = [v for q in phase for v in (slice(None), q)]
        result[(slice(None), *place, slice(None))] = phases.pop(0)
    return result.reshape(n, *(m * s for m, s in zip(sizes, strides)), c)


def pads_by_copy(rank: int) -> bool:
    return False


def transposed_product(a, b):
    return product(a.t(), b)


def product(a, b):
    if a.device.type == "cpu" and a.dtype == torch.float16:
        # As keras.ops.matmul does on CPU: float16 summed in float32.
        return torch.matmul(a.float(), b.float()).to(torch.float16)
    return torch.matmul(a, b)


def device_kind(x):
    return x.device.type.upper()


def times_forms() -> bool:
    return True


def time_forms(forms, shapes, dtype):
    # Imported here: the seam's package imports this module.
    from keras_rotconv._backend import _least_seconds

    device = keras.ops.convert_to_tensor(0.0).device
    dtype = getattr(torch, keras.backend.standardize_dtype(dtype))

    def call(form):
        with torch.no_grad():
            form(*tensors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tensors = [
        torch.randn(shape, dtype=dtype, device=device) for shape in shapes
    ]
    return _least_seconds([lambda f=f: call(f) for f in forms])


def traced_by_torch_compile() -> bool:
    return torch.compiler.is_compiling()


def untraced(rule, shape, a, b, sizes, strides, pairs, dilation, groups):
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        # Differentiated (a gradient of the gradient): autograd has no
        # formula for the op, so the tracer takes the rule's steps.
        return rule(a, b, sizes, strides, pairs, dilation, groups)
    return _untraced_rule(
        f"{rule.__module__}:{rule.__name__}",
        list(shape),
        a,
        b,
        list(sizes),
        list(strides),
        [v for pair in pairs for v in pair],
        list(dilation),
        groups,
    )


@torch.library.custom_op("keras_rotconv::untraced_rule", mutates_args=())
def _untraced_rule(
    name: str,
    shape: list[int],
    a: torch.Tensor,
    b: torch.Tensor,
    sizes: list[int],
    strides: list[int],
    pairs: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    # Runs when the compiled step runs, on concrete tensors: every size is
    # a Python int here, whatever the tracer made of it.
    module, function = name.split(":")
    rule = getattr(importlib.import_module(module), function)
    pairs = tuple(zip(pairs[::2], pairs[1::2]))
    result = rule(
        a, b, tuple(sizes), tuple(strides), pairs, tuple(dilation), groups
    )
    # The compiled code expects the layout the fake below gives: a form may
    # return a transposed view.
    return result.contiguous()


@_untraced_rule.register_fake
def _(name, shape, a, b, sizes, strides, pairs, dilation, groups):
    return a.new_empty(shape)
