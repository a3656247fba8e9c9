"""The backend seam on JAX (see ``keras_rotconv._backend``)."""

from __future__ import annotations

import jax
import keras

_JAX_LAYOUTS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def correlate(x, w, strides, dilation, groups, pairs):
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding=pairs,
        rhs_dilation=dilation,
        dimension_numbers=_JAX_LAYOUTS[len(strides)],
        feature_group_count=groups,
    )


def custom_gradient(forward, backward):
    @jax.custom_vjp
    def op(*tensors):
        return forward(*tensors)

    def op_forward(*tensors):
        return forward(*tensors), tensors

    def op_backward(tensors, upstream):
        needed = (True,) * len(tensors)
        return tuple(backward(upstream, *tensors, needed=needed))

    op.defvjp(op_forward, op_backward)
    return op


def pad(x, widths):
    return keras.ops.pad(x, widths)


def add_bias(z, b):
    return z + b


def after(x, *earlier):
    # XLA schedules on its own.
    return x


def shared_filter(w):
    return w


def runs_groups_apart(w_shape, strides, dilation, groups) -> bool:
    return False


def sums_depthwise_taps() -> bool:
    # A grouped convolution whose filter (the delta) is as large as the
    # image runs slowly.
    return True


def pads_by_copy(rank: int) -> bool:
    return False


def transposed_product(a, b):
    return jax.numpy.matmul(a.T, b)


def product(a, b):
    return jax.numpy.matmul(a, b)


def device_kind(x):
    return ""


def times_forms() -> bool:
    # XLA compiles the whole step and chooses its own way to compute each
    # form.
    return False


def time_forms(forms, shapes, dtype):
    raise NotImplementedError("JAX does not time forms (times_forms).")


def traced_by_torch_compile() -> bool:
    return False
