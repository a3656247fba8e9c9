"""The backend seam on JAX (see ``keras_rotconv._backend``)."""

from __future__ import annotations

import itertools
import math

import jax
import keras

from keras_rotconv._shapes import tap_slices

_JAX_LAYOUTS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def correlate(x, w, strides, dilation, groups, pairs):
    if _sums_taps(w.shape, groups):
        return _by_taps(x, w, strides, dilation, groups, pairs)
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding=pairs,
        rhs_dilation=dilation,
        dimension_numbers=_JAX_LAYOUTS[len(strides)],
        feature_group_count=groups,
    )


# The most taps ``_by_taps`` writes out one by one (a 5x5x5 kernel); a
# larger filter, such as the delta in a kernel gradient's convolution, stays
# a convolution.
MAX_TAPS = 125


def _sums_taps(w_shape, groups) -> bool:
    """Whether ``correlate`` sums products per tap (``_by_taps``): on the
    CPU, for groups of one input or one output channel, and a kernel of at
    most ``MAX_TAPS`` taps."""
    cin_g, cout_g = w_shape[-2], w_shape[-1] // groups
    return (
        groups > 1
        and min(cin_g, cout_g) == 1
        and math.prod(w_shape[:-2]) <= MAX_TAPS
        and jax.default_backend() == "cpu"
    )


def _by_taps(x, w, strides, dilation, groups, pairs):
    """A grouped convolution with one input or one output channel per group
    (a depthwise layer's forward pass, and its input delta) as a sum over
    the taps of a window of ``x`` times that tap's filter entries; with one
    input channel per group, ``out[n, p, c·m + j] = Σ_k x̂[n, p·s + k·d,
    c] · w[k, 0, c·m + j]``. XLA fuses it into one pass over ``x``; its CPU
    grouped convolution took about 40 times as long
    (benchmarks/results/README.md, "Measured figures"). Float16 and
    bfloat16 are summed in float32, as the convolution does."""
    # Imported here: the seam's package imports this module.
    from keras_rotconv._backend import _result_shape

    *kernel_size, cin_g, cout = w.shape
    cout_g = cout // groups
    shape = _result_shape(x, w, strides, dilation, pairs)
    dtype = x.dtype
    if dtype in (jax.numpy.float16, jax.numpy.bfloat16):
        x, w = x.astype("float32"), w.astype("float32")
    padded = jax.numpy.pad(x, [(0, 0), *pairs, (0, 0)])
    # The input (..., g, C_in/g, 1) against each tap's filter (g, C_in/g,
    # C_out/g): one of the two channel axes is 1 wide, so the products are
    # a broadcast, summed over the input channels of each group.
    padded = padded.reshape(*padded.shape[:-1], groups, cin_g, 1)
    w = w.reshape(*kernel_size, cin_g, groups, cout_g)
    w = jax.numpy.moveaxis(w, -2, -3)
    total = None
    for tap in itertools.product(*map(range, kernel_size)):
        window = padded[
            (slice(None), *tap_slices(tap, strides, dilation, shape[1:-1]))
        ]
        term = window * w[tap]
        total = term if total is None else total + term
    if cin_g > 1:
        total = total.sum(axis=-2)
    return total.reshape(shape).astype(dtype)


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
    # The device a jitted step runs on is the default one (Keras places
    # nothing else); a traced x has none of its own.
    return jax.default_backend().upper()


def times_forms() -> bool:
    return True


# A form whose compiled memory (its operands, temporaries and result)
# exceeds the first form's by more than this factor is not chosen, however
# fast: XLA schedules a form's temporaries its own way, and the tap
# products raised a TensorFlow XLA step's peak memory to 1.8-3.3 times
# Conv2D's.
MEMORY_MARGIN = 1.1


def time_forms(forms, shapes, dtype):
    # Imported here: the seam's package imports this module.
    from keras_rotconv._backend import _least_seconds

    # Each form compiled on its own and run on concrete arrays, while the
    # step that asked is traced: what runs here is evaluated, not traced.
    with jax.ensure_compile_time_eval():
        keys = jax.random.split(jax.random.key(0), len(shapes))
        tensors = [
            jax.random.normal(key, shape, dtype)
            for key, shape in zip(keys, shapes)
        ]
        compiled = [jax.jit(form).lower(*tensors).compile() for form in forms]
        memory = [_bytes(c) for c in compiled]
        calls = [
            (lambda c=c: jax.block_until_ready(c(*tensors))) for c in compiled
        ]
        seconds = _least_seconds(calls)
    if None in memory:
        return seconds
    return [
        math.inf if m > MEMORY_MARGIN * memory[0] else t
        for t, m in zip(seconds, memory)
    ]


def _bytes(compiled):
    """The bytes of a compiled function's operands, temporaries and result,
    or None where the platform does not say."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
    )


def traced_by_torch_compile() -> bool:
    return False
