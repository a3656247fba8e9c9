"""Shared helpers: tolerances, backend-neutral gradients, layer twins.

The suite runs on whichever backend ``KERAS_BACKEND`` selects. Gradients of
the built-in Keras layers come from that backend's own autodiff
(``tf.GradientTape``, ``jax.grad`` over ``stateless_call``, torch autograd),
and serve as one oracle; ``keras_rotconv.reference`` and float64 finite
differences are the others.
"""

import itertools
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# float64 tests need JAX's 64-bit mode, which is off by default and must be
# on before JAX first runs.
os.environ.setdefault("JAX_ENABLE_X64", "true")

# Importing torch after TensorFlow can crash; Keras's own test suite imports
# it first for the same reason.
try:
    import torch  # noqa: F401
except ImportError:
    pass

import keras
import numpy as np
import pytest
from hypothesis import settings

from keras_rotconv import RotConv1D, RotConv2D, RotConv3D, reference
from keras_rotconv.tools import verify

BACKEND = keras.backend.backend()

# In CI every hypothesis test draws the same examples on every run, so that
# a run cannot fail by the draw; elsewhere each run draws afresh.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("dev")
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _cpu():
    """The CPU's model name and the ISA flags that decide TensorFlow's
    default oneDNN setting, from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU", set()
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def pytest_report_header(config):
    """Where a run ran: the CPU, its flags, and oneDNN's setting, which
    changes TensorFlow's and torch's CPU convolutions (and their bugs)."""
    model, flags = _cpu()
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    present = [flag for flag in wanted if flag in flags] or ["none of"]
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if setting is None:
        default = {"avx512_vnni", "avx512_bf16", "amx_tile"} & flags
        setting = f"unset (TensorFlow's default: {'on' if default else 'off'})"
    return [
        f"keras_rotconv: backend {BACKEND}, keras {keras.__version__}",
        f"CPU: {model}; flags: {' '.join(present)} ({', '.join(wanted)})",
        f"TF_ENABLE_ONEDNN_OPTS: {setting}; hypothesis profile: "
        f"{settings.get_current_profile_name()}",
    ]


# Each RotConv layer and the built-in layer it replaces, by number of
# spatial axes.
LAYERS = {
    1: (RotConv1D, keras.layers.Conv1D),
    2: (RotConv2D, keras.layers.Conv2D),
    3: (RotConv3D, keras.layers.Conv3D),
}

# Largest absolute difference divided by the largest magnitude of the
# expected value. float64 rounding in sums of a few hundred terms is ~1e-15;
# float32 is ~1e-7 per operation, so 1e-5 leaves room for different but
# equally valid summation orders and nothing more.
FLOAT64_RTOL = 1e-10
FLOAT32_RTOL = 1e-5
RTOL = {"float64": FLOAT64_RTOL, "float32": FLOAT32_RTOL}

# Central differences in float64 with this step have truncation error
# ~step**2 * |f'''| and rounding error ~1e-16 / step: ~1e-8 for these
# smooth, O(1) losses.
FD_STEP = 1e-5
FD_RTOL = 1e-7


@pytest.fixture(autouse=True, scope="session")
def _full_float32_products():
    """The float32 tolerances hold for float32 arithmetic. On NVIDIA GPUs
    the backends may round float32 products to TF32 (10 mantissa bits):
    torch in cuDNN's convolutions, JAX in every convolution and matrix
    product (``jax_default_matmul_precision``; ``NVIDIA_TF32_OVERRIDE=0``
    reaches cuDNN and cuBLAS but not XLA's own product kernels: on an H200,
    1x1 kernel gradients came out 4e-4 off). So the suite runs with TF32
    off, as ``keras-rotconv verify`` compares. No effect on a CPU."""
    with verify.full_float32_precision():
        yield


def relative_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (
        f"shape {actual.shape} != expected {expected.shape}"
    )
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


# The largest error seen per tolerance, printed at the end of the run, over
# the whole run and for each rank of the parity grid.
_LARGEST_ERRORS: dict[tuple[float, str], tuple[float, str]] = {}


def assert_close(actual, expected, rtol, what):
    error = relative_error(actual, expected)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    scopes = ["all tests"]
    if "test_parity.py::" in test and "[" in test:
        scopes.append(f"parity grid {test.split('[')[1][:2]}")
    for scope in scopes:
        worst = _LARGEST_ERRORS.get((rtol, scope), (-1.0, ""))
        if error > worst[0]:
            _LARGEST_ERRORS[rtol, scope] = (error, f"{what} in {test}")
    assert error <= rtol, f"{what}: relative error {error:.3e} > {rtol:.0e}"


def pytest_terminal_summary(terminalreporter, config):
    # Also at the end: the header is not printed under -q.
    terminalreporter.section("where this ran")
    for line in pytest_report_header(config):
        terminalreporter.write_line(line)
    if not _LARGEST_ERRORS:
        return
    terminalreporter.section(
        f"largest relative errors per tolerance ({BACKEND} backend)"
    )
    for (rtol, scope), (error, where) in sorted(_LARGEST_ERRORS.items()):
        terminalreporter.write_line(
            f"tolerance {rtol:.0e}, {scope}: {error:.2e} ({where})"
        )


# act(z) and act'(z) for the activations the tests use, in NumPy.
_ACTIVATIONS = {
    "linear": (lambda z: z, np.ones_like),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
    "sigmoid": (
        lambda z: 1 / (1 + np.exp(-z)),
        lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2,
    ),
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
}


def reference_results(layer, x, upstream):
    """``(y, dC/dx, dC/dkernel, dC/dbias)`` of ``layer`` (its weights,
    arguments and activation) computed by keras_rotconv.reference in
    float64, for the loss ``Σ y · upstream``; ``x``, ``upstream`` and the
    results in ``layer.data_format``."""
    first = layer.data_format == "channels_first"
    if first:
        x, upstream = np.moveaxis(x, 1, -1), np.moveaxis(upstream, 1, -1)
    x, upstream = x.astype("float64"), upstream.astype("float64")
    weights = [np.asarray(w, dtype="float64") for w in layer.get_weights()]
    kernel = weights[0]
    bias = weights[1] if layer.use_bias else np.zeros(kernel.shape[-1])
    motion = dict(
        strides=tuple(layer.strides),
        dilation=tuple(layer.dilation_rate),
        padding=layer.padding,
        groups=layer.groups,
    )
    act, slope = _ACTIVATIONS[layer.activation.__name__]
    y = act(reference.forward(x, kernel, bias, **motion))
    dx, dkernel, dbias = reference.layer_backward(
        x, kernel, bias, upstream, slope, **motion
    )
    if first:
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
    return y, dx, dkernel, dbias


def numeric_gradient(loss, array, step=FD_STEP):
    """Central differences of ``loss()`` with respect to each entry of
    ``array``, perturbed in place."""
    grad = np.zeros_like(array)
    for index in np.ndindex(*array.shape):
        saved = array[index]
        array[index] = saved + step
        up = loss()
        array[index] = saved - step
        down = loss()
        array[index] = saved
        grad[index] = (up - down) / (2 * step)
    return grad


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def gradients(layer, x, upstream):
    """``(y, dC/dx, {variable name: dC/dvariable})`` for ``C = Σ y ·
    upstream``, by the backend's own automatic differentiation."""
    return _GRADIENTS[BACKEND](layer, x, upstream)


def _tf_gradients(layer, x, upstream):
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * upstream)
    variables = layer.trainable_variables
    dx, *dvars = tape.gradient(loss, [x, *variables])
    return _as_numpy(y, dx, variables, dvars)


def _jax_gradients(layer, x, upstream):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        y, _ = layer.stateless_call(trainable, frozen, x)
        return jnp.sum(y * upstream), y

    # Compiled as one program: several times faster than dispatching each
    # operation on its own, and the differentiation is the same.
    (_, y), (dvars, dx) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(trainable, jnp.asarray(x))
    return _as_numpy(y, dx, layer.trainable_variables, dvars)


def _torch_gradients(layer, x, upstream):
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = layer(x)
    # On a GPU the layer computes on the device it placed its weights on.
    (y * torch.as_tensor(upstream, device=y.device)).sum().backward()
    variables = layer.trainable_variables
    return _as_numpy(y, x.grad, variables, [v.value.grad for v in variables])


def _as_numpy(y, dx, variables, dvars):
    return (
        to_numpy(y),
        to_numpy(dx),
        {v.name: to_numpy(d) for v, d in zip(variables, dvars, strict=True)},
    )


def penalty_gradients(layer, x, upstream):
    """``{variable name: dP/dvariable}`` for the gradient penalty
    ``P = Σ (dC/dx)^2``, ``C = Σ y · upstream``: a second-order gradient."""
    return _PENALTY_GRADIENTS[BACKEND](layer, x, upstream)


def _tf_penalty_gradients(layer, x, upstream):
    import tensorflow as tf

    x = tf.constant(x)
    variables = layer.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(layer(x) * upstream)
        penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
    dvars = outer.gradient(penalty, variables)
    return {v.name: to_numpy(d) for v, d in zip(variables, dvars, strict=True)}


def _jax_penalty_gradients(layer, x, upstream):
    import jax
    import jax.numpy as jnp

    frozen = [v.value for v in layer.non_trainable_variables]

    def penalty(trainable):
        def loss(x):
            y, _ = layer.stateless_call(trainable, frozen, x)
            return jnp.sum(y * upstream)

        return jnp.sum(jax.grad(loss)(x) ** 2)

    variables = layer.trainable_variables
    dvars = jax.jit(jax.grad(penalty))([v.value for v in variables])
    return {v.name: to_numpy(d) for v, d in zip(variables, dvars, strict=True)}


def _torch_penalty_gradients(layer, x, upstream):
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = layer(x)
    loss = (y * torch.as_tensor(upstream, device=y.device)).sum()
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    (dx**2).sum().backward()
    return {v.name: to_numpy(v.value.grad) for v in layer.trainable_variables}


_PENALTY_GRADIENTS = {
    "tensorflow": _tf_penalty_gradients,
    "jax": _jax_penalty_gradients,
    "torch": _torch_penalty_gradients,
}


_GRADIENTS = {
    "tensorflow": _tf_gradients,
    "jax": _jax_gradients,
    "torch": _torch_gradients,
}


def make_twins(rot_class, keras_class, config, input_shape, seed=0):
    """A RotConv layer and its built-in twin, built for ``input_shape``, with
    the same random weights."""
    # A zeros initializer skips Keras's random one, which compiles a JAX
    # program per kernel shape (seconds per layer on CPU); the weights are
    # replaced anyway.
    config = {"kernel_initializer": "zeros", **config}
    rot = rot_class(**config)
    twin = keras_class(**config)
    rot.build(input_shape)
    twin.build(input_shape)
    share_random_weights([rot, twin], seed)
    return rot, twin


def share_random_weights(layers, seed=0):
    """Give built layers of the same weight shapes the same random weights
    (the bias random too, so that it matters)."""
    rng = np.random.default_rng(seed)
    weights = [
        (rng.standard_normal(w.shape) * 0.5).astype(w.dtype)
        for w in layers[0].get_weights()
    ]
    for layer in layers:
        layer.set_weights(weights)


def child_environment(**extra):
    """This process's environment for a Python child process, with this
    checkout's keras_rotconv first on its path and TensorFlow's logs quiet."""
    import keras_rotconv

    root = str(Path(keras_rotconv.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **extra,
    }


# The TensorFlow ops of a framework's own convolution gradient: never in a
# RotConv gradient graph, always in the built-in layers'.
TF_CONV_GRADIENTS = {
    "Conv2DBackpropInput",
    "Conv2DBackpropInputV2",
    "Conv2DBackpropFilter",
    "Conv2DBackpropFilterV2",
    "Conv3DBackpropInput",
    "Conv3DBackpropInputV2",
    "Conv3DBackpropFilter",
    "Conv3DBackpropFilterV2",
    "DepthwiseConv2dNativeBackpropInput",
    "DepthwiseConv2dNativeBackpropFilter",
}


def jax_equations(closed_jaxpr):
    """Every equation of a traced JAX program, nested programs included."""
    stack, found = [closed_jaxpr.jaxpr], []
    while stack:
        jaxpr = stack.pop()
        for eqn in jaxpr.eqns:
            found.append(eqn)
            for param in eqn.params.values():
                for value in param if isinstance(param, tuple) else (param,):
                    if hasattr(value, "eqns"):
                        stack.append(value)
                    elif hasattr(value, "jaxpr"):
                        stack.append(value.jaxpr)
    return found


def all_pairs(factors):
    """Rows (dicts of factor name to value) in which every value of each
    factor meets every value of each other factor at least once, chosen
    greedily: each row covers the most pairs not yet covered."""
    names = list(factors)
    combos = list(itertools.combinations(range(len(names)), 2))

    def pairs(row):
        return {(a, row[a], b, row[b]) for a, b in combos}

    candidates = list(
        itertools.product(*(range(len(factors[n])) for n in names))
    )
    uncovered = set().union(*map(pairs, candidates))
    rows = []
    while uncovered:
        best = max(candidates, key=lambda row: len(pairs(row) & uncovered))
        uncovered -= pairs(best)
        rows.append({n: factors[n][i] for n, i in zip(names, best)})
    return rows


def tf_gradient_graph_ops(layer, shape, dtype="float32"):
    """Every op type of a tf.function computing the first-order gradients
    of ``layer`` on inputs of ``shape`` and the gradient of a gradient
    penalty, in the graph and in the functions it calls."""
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.sin(layer(x)))
            dx, *dvars = inner.gradient(loss, [x, *layer.trainable_variables])
            penalty = tf.reduce_sum(dx**2)
        return dvars, outer.gradient(penalty, layer.trainable_variables)

    spec = tf.TensorSpec(shape, dtype)
    graph = step.get_concrete_function(spec).graph.as_graph_def()
    types = {node.op for node in graph.node}
    for function in graph.library.function:
        types |= {node.op for node in function.node_def}
    return types
