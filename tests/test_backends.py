"""The derived backward pass on every backend: it is the one that runs, a bug
in it raises instead of hiding, and the layers compile under each backend's
own compiler (TensorFlow's graph checks are in test_tensorflow.py)."""

import os

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    FLOAT64_RTOL,
    LAYERS,
    assert_close,
    gradients,
    jax_equations,
    make_twins,
    to_numpy,
)

from keras_rotconv import _backend, ops

# Strided, so that a framework's own conv gradient would need a transposed
# (input-dilated) convolution, which the derived rules never use.
CONFIGS = {
    1: dict(filters=4, kernel_size=3, strides=2, padding="causal"),
    2: dict(filters=4, kernel_size=3, strides=2, padding="same", groups=2),
    3: dict(filters=4, kernel_size=(2, 3, 2), strides=(2, 1, 2)),
}
SHAPES = {1: (2, 9, 2), 2: (2, 7, 6, 2), 3: (1, 5, 4, 5, 2)}
RANKS = pytest.mark.parametrize("rank", sorted(LAYERS))


def _twins(rank, dtype="float64"):
    config = dict(CONFIGS[rank], dtype=dtype)
    return make_twins(*LAYERS[rank], config, SHAPES[rank])


def _inputs(rank, layer, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPES[rank])
    return x, rng.standard_normal(layer.compute_output_shape(x.shape))


def _record_rule_calls(monkeypatch):
    """The names of the derived rules (ops.input_delta, kernel_gradient,
    bias_gradient) in the order they are called from now on."""
    calls = []
    for name in ("input_delta", "kernel_gradient", "bias_gradient"):
        rule = getattr(ops, name)

        def recorded(*args, _rule=rule, _name=name, **kwargs):
            calls.append(_name)
            return _rule(*args, **kwargs)

        monkeypatch.setattr(ops, name, recorded)
    return calls


@RANKS
def test_each_derived_rule_runs_for_the_gradient(rank, monkeypatch):
    """The backward pass calls ops.input_delta, ops.kernel_gradient and
    ops.bias_gradient, on every backend, and its result is what the
    backend's autodiff returns."""
    calls = _record_rule_calls(monkeypatch)
    rot, twin = _twins(rank)
    x, upstream = _inputs(rank, rot)
    _, dx, dvars = gradients(rot, x, upstream)
    assert sorted(calls) == ["bias_gradient", "input_delta", "kernel_gradient"]
    _, dx_ref, dvars_ref = gradients(twin, x, upstream)
    assert_close(dx, dx_ref, FLOAT64_RTOL, "dC/dx")
    assert_close(dvars["kernel"], dvars_ref["kernel"], FLOAT64_RTOL, "dC/dw")


@RANKS
def test_torch_skips_the_gradients_nothing_reads(rank, monkeypatch):
    """torch runs every operation it is given, so the backward pass asks
    autograd which gradients it will read: no input delta for an input
    that needs no gradient (a first layer), no kernel gradient for a frozen
    layer. (A TensorFlow graph and a jitted JAX function drop unread work
    themselves.)"""
    if BACKEND != "torch":
        pytest.skip("torch's autograd says which gradients it reads")
    import torch

    calls = _record_rule_calls(monkeypatch)
    rot, twin = _twins(rank)
    x, upstream = _inputs(rank, rot)
    device = rot.kernel.value.device

    def grads(layer, wrt_input):
        xt = torch.tensor(x, device=device, requires_grad=wrt_input)
        loss = (layer(xt) * torch.tensor(upstream, device=device)).sum()
        wrt = [v.value for v in layer.trainable_variables]
        return torch.autograd.grad(loss, [xt] * wrt_input + wrt)

    mine, theirs = grads(rot, False), grads(twin, False)
    assert calls == ["kernel_gradient", "bias_gradient"]
    for name, a, b in zip(["dC/dw", "dC/db"], mine, theirs, strict=True):
        assert_close(to_numpy(a), to_numpy(b), FLOAT64_RTOL, name)

    calls.clear()
    rot.trainable = twin.trainable = False
    (mine,), (theirs,) = grads(rot, True), grads(twin, True)
    assert calls == ["input_delta"]
    assert_close(to_numpy(mine), to_numpy(theirs), FLOAT64_RTOL, "dC/dx")


@RANKS
def test_an_error_in_the_backward_pass_raises(rank, monkeypatch):
    """No backend turns an exception inside the derived gradient into NaNs
    or zeros (keras.ops.custom_gradient on torch would)."""

    def broken(*args, **kwargs):
        raise RuntimeError("planted in input_delta")

    monkeypatch.setattr(ops, "input_delta", broken)
    rot, _ = _twins(rank)
    x, upstream = _inputs(rank, rot)
    with pytest.raises(RuntimeError, match="planted in input_delta"):
        gradients(rot, x, upstream)


@RANKS
def test_an_error_in_the_forward_pass_raises(rank, monkeypatch):
    """The same for the forward function wrapped by the custom gradient,
    whose exceptions keras.ops.custom_gradient swallows on torch."""

    def broken(*args, **kwargs):
        raise RuntimeError("planted in correlate")

    monkeypatch.setattr(_backend, "correlate", broken)
    rot, _ = _twins(rank)
    x, upstream = _inputs(rank, rot)
    with pytest.raises(RuntimeError, match="planted in correlate"):
        gradients(rot, x, upstream)


@RANKS
def test_float64_tanh_output_dtype_matches_builtin(rank):
    """On JAX, Keras computes tanh of float64 in float32 (its type promotion
    maps float64 to float32 outside TensorFlow), for the built-in layers as
    for these; the float64 tests therefore use sigmoid, which keeps float64
    everywhere."""
    config = dict(CONFIGS[rank], activation="tanh", dtype="float64")
    rot, twin = make_twins(*LAYERS[rank], config, SHAPES[rank])
    x = np.random.default_rng(0).standard_normal(SHAPES[rank])
    assert to_numpy(rot(x)).dtype == to_numpy(twin(x)).dtype
    sigmoid = LAYERS[rank][0](
        **dict(config, activation="sigmoid", kernel_initializer="zeros")
    )
    assert to_numpy(sigmoid(x)).dtype == "float64"


# JAX ---------------------------------------------------------------------

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="JAX programs only")


def _jax_gradient_programs(layer, x):
    """The traced programs of dC/d(weights, x) and of the gradient of a
    gradient penalty, C = Σ sin(y)."""
    import jax
    import jax.numpy as jnp

    weights = [v.value for v in layer.trainable_variables]

    def loss(weights, x):
        y, _ = layer.stateless_call(weights, [], x)
        return jnp.sum(jnp.sin(y))

    def penalty(weights, x):
        return jnp.sum(jax.grad(loss, argnums=1)(weights, x) ** 2)

    first = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(weights, x)
    second = jax.make_jaxpr(jax.grad(penalty))(weights, x)
    return first, second


@jax_only
@RANKS
def test_jax_gradient_program_is_the_custom_vjp(rank):
    """The gradient programs hold the custom VJP and no transposed
    convolution (JAX's own conv gradient dilates its input by the strides),
    to second order; the built-in layer's program has one, which shows the
    check can see it."""
    rot, twin = _twins(rank)
    x = np.random.default_rng(0).standard_normal(SHAPES[rank])

    def transposed(eqns):
        return [
            e
            for e in eqns
            if e.primitive.name == "conv_general_dilated"
            and any(d != 1 for d in e.params["lhs_dilation"])
        ]

    for program in _jax_gradient_programs(rot, x):
        eqns = jax_equations(program)
        assert any(e.primitive.name == "custom_vjp_call" for e in eqns)
        assert any(e.primitive.name == "conv_general_dilated" for e in eqns)
        assert not transposed(eqns), transposed(eqns)
    twin_first, _ = _jax_gradient_programs(twin, x)
    assert transposed(jax_equations(twin_first))


# (rank, channels, input channels per group, outputs per group, stride,
# dilation, padding): depthwise forward passes (one input channel per group,
# multipliers 1 and 2) and their input deltas (one output per group), a
# covering set of strides, dilations and uneven padding.
TAP_SUM_CASES = [
    (1, 3, 1, 1, 1, 1, (2, 0)),
    (1, 3, 2, 1, 2, 2, (1, 1)),
    (2, 4, 1, 2, 1, 2, (0, 2)),
    (2, 4, 1, 1, 2, 1, (1, 1)),
    (2, 3, 3, 1, 1, 1, (2, 2)),
    (2, 2, 2, 1, 2, 2, (0, 0)),
    (3, 2, 1, 3, 2, 1, (1, 0)),
    (3, 3, 2, 1, 1, 2, (0, 1)),
]


@jax_only
@pytest.mark.parametrize("case", TAP_SUM_CASES, ids=str)
def test_jax_sums_over_taps_equal_the_grouped_convolution(case):
    """On the CPU, JAX's ``correlate`` computes a grouped convolution of one
    input or one output channel per group as a sum over the taps (XLA's
    own grouped convolution runs slowly there): equal, in float64, to
    ``lax.conv_general_dilated``; half types summed in float32."""
    import jax
    import jax.numpy as jnp

    from keras_rotconv._backend import jax as seam

    rank, groups, cin_g, cout_g, stride, dilation, pair = case
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, *(7,) * rank, groups * cin_g)))
    w = jnp.asarray(rng.standard_normal((*(3,) * rank, cin_g, groups * cout_g)))
    args = ((stride,) * rank, (dilation,) * rank, groups, (pair,) * rank)
    assert seam._sums_taps(w.shape, groups)
    expected = jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=args[0],
        padding=args[3],
        rhs_dilation=args[1],
        dimension_numbers=seam._JAX_LAYOUTS[rank],
        feature_group_count=groups,
        precision="highest",
    )
    actual = _backend.correlate(x, w, *args)
    assert_close(to_numpy(actual), to_numpy(expected), FLOAT64_RTOL, "sums")
    half = _backend.correlate(x.astype("bfloat16"), w.astype("bfloat16"), *args)
    assert half.dtype == "bfloat16"
    in_float32 = seam._by_taps(
        x.astype("bfloat16").astype("float32"),
        w.astype("bfloat16").astype("float32"),
        *args,
    )
    assert np.array_equal(
        to_numpy(half.astype("float32")),
        to_numpy(in_float32.astype("bfloat16").astype("float32")),
    )


@jax_only
def test_jax_sums_over_taps_only_for_small_kernels():
    """A filter with more than ``MAX_TAPS`` taps (the delta, in a kernel
    gradient's grouped convolution) stays a convolution."""
    from keras_rotconv._backend import jax as seam

    assert seam._sums_taps((5, 5, 5, 1, 8), 8)
    assert not seam._sums_taps((6, 5, 5, 1, 8), 8)
    assert not seam._sums_taps((3, 3, 2, 8), 4)  # two in and out per group
    assert not seam._sums_taps((3, 3, 1, 8), 1)  # no groups


@jax_only
def test_jax_jit_retraces_for_each_input_size():
    """Under jax.jit every size is static: one jitted gradient function
    meets three input sizes, tracing the padding arithmetic for each."""
    import jax
    import jax.numpy as jnp

    config = dict(filters=4, kernel_size=3, strides=2, padding="same")
    rot, twin = make_twins(
        *LAYERS[2], dict(config, dtype="float64"), (None, None, None, 3)
    )

    def step_for(layer):
        def loss(weights, x):
            y, _ = layer.stateless_call(weights, [], x)
            return jnp.sum(y * jnp.cos(y))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    rot_step, twin_step = step_for(rot), step_for(twin)
    rng = np.random.default_rng(0)
    for shape in [(2, 9, 6, 3), (1, 4, 5, 3), (3, 11, 11, 3)]:
        x = jnp.asarray(rng.standard_normal(shape))
        mine = rot_step([v.value for v in rot.trainable_variables], x)
        theirs = twin_step([v.value for v in twin.trainable_variables], x)
        for name, a, b in zip(
            ["dkernel", "dbias", "dx"],
            [*mine[0], mine[1]],
            [*theirs[0], theirs[1]],
            strict=True,
        ):
            assert_close(to_numpy(a), to_numpy(b), FLOAT64_RTOL, name)


# torch -------------------------------------------------------------------

torch_only = pytest.mark.skipif(
    BACKEND != "torch", reason="torch autograd graphs only"
)


@torch_only
def test_torch_depthwise_tap_sums_share_a_buffer_unless_differentiated(
    monkeypatch,
):
    """The depthwise kernel gradient's products go into one buffer
    (``_backend.summed_products``), except where the kernel gradient is
    itself differentiated (autograd records no ``out=`` writes): both
    orders agree with the built-in layer in float64."""
    import torch

    apart = []
    summed_apart = _backend._products_summed_apart

    def counted(*args):
        apart.append(args)
        return summed_apart(*args)

    monkeypatch.setattr(_backend, "_products_summed_apart", counted)
    config = dict(filters=6, kernel_size=3, groups=3, padding="same")
    rot, twin = make_twins(
        *LAYERS[2], dict(config, dtype="float64"), (2, 7, 6, 3)
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 3))
    upstream = torch.as_tensor(rng.standard_normal((2, 7, 6, 6)))

    def penalty(layer):
        xt = torch.tensor(x, requires_grad=True)
        loss = (layer(xt) * upstream).sum()
        (dw,) = torch.autograd.grad(loss, layer.kernel.value, create_graph=True)
        (dx,) = torch.autograd.grad((dw**2).sum(), xt)
        return to_numpy(dw.detach()), to_numpy(dx)

    _, _, dvars = gradients(rot, x, upstream.numpy())
    assert apart == []
    _, _, dvars_twin = gradients(twin, x, upstream.numpy())
    assert_close(dvars["kernel"], dvars_twin["kernel"], FLOAT64_RTOL, "dw")
    (dw, dpenalty), (dw_twin, dpenalty_twin) = penalty(rot), penalty(twin)
    assert len(apart) == 1
    assert_close(dw, dw_twin, FLOAT64_RTOL, "dw, differentiable")
    assert_close(dpenalty, dpenalty_twin, FLOAT64_RTOL, "d(Σ dw²)/dx")


def _autograd_nodes(tensor):
    """The class names of every node of the autograd graph behind
    ``tensor``."""
    stack, seen, names = [tensor.grad_fn], set(), set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@torch_only
@RANKS
def test_torch_autograd_graph_is_the_derived_function(rank):
    """The output's autograd graph runs the derived function, and so does
    the graph of dC/dx built for a second derivative; neither holds
    torch's own convolution backward, which the built-in layer's graph
    does."""
    import torch

    rot, twin = _twins(rank)
    x = torch.tensor(
        np.random.default_rng(0).standard_normal(SHAPES[rank]),
        requires_grad=True,
    )
    derived = "_TorchDerivedGradientBackward"
    builtin = {"ConvolutionBackward0", "ConvolutionBackwardBackward0"}

    loss = torch.sin(rot(x)).sum()
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    for tensor in (loss, dx):
        nodes = _autograd_nodes(tensor)
        assert derived in nodes, sorted(nodes)
        assert not nodes & builtin, sorted(nodes & builtin)
    assert _autograd_nodes(torch.sin(twin(x)).sum()) & builtin


def _untraced_rules(graphs):
    """The rules each recorded torch.compile graph calls as
    ``keras_rotconv::untraced_rule`` (see ``_backend.untraced``)."""
    return [
        node.args[0].split(":")[1]
        for graph in graphs
        for node in graph.graph.nodes
        if "untraced_rule" in str(node.target)
    ]


@torch_only
@RANKS
@pytest.mark.parametrize("textbook", [False, True], ids=["forms", "textbook"])
# (torch's graph-recording test backend returns an unboxed function.)
@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_torch_compile_traces_the_layer_whole(rank, textbook):
    """torch.compile(fullgraph=True) traces forward and derived backward
    with no graph break. The compiled backward pass calls the cheaper forms
    as one op each, ``keras_rotconv::untraced_rule``, which runs on
    concrete sizes when the step runs; traced inside textbook_rules(), it
    holds the textbook rules' own steps instead. Either way, the same
    gradients as eager execution and as the built-in layer. (The
    "aot_eager" backend checks the tracing; model.fit with
    jit_compile=True in test_training.py runs inductor.)"""
    import contextlib

    import torch
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    import keras_rotconv

    rot, twin = _twins(rank)
    x, upstream = _inputs(rank, rot)
    upstream = torch.tensor(upstream, device=rot.kernel.value.device)

    def loss(layer):
        return lambda x: (layer(x) * upstream).sum()

    mode = keras_rotconv.textbook_rules if textbook else contextlib.nullcontext
    torch._dynamo.reset()
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(loss(rot), fullgraph=True, backend=recorder)
    results = []
    for layer, run in ((rot, compiled), (rot, loss(rot)), (twin, loss(twin))):
        xt = torch.tensor(x, requires_grad=True)
        for v in layer.trainable_variables:
            v.value.grad = None
        with mode():
            run(xt).backward()
        results.append(
            [xt.grad, *(v.value.grad for v in layer.trainable_variables)]
        )
    assert _untraced_rules(recorder.fw_graphs) == []
    rules = ["_cheapest_kernel_gradient", "_cheapest_input_delta"]
    assert _untraced_rules(recorder.bw_graphs) == ([] if textbook else rules)
    compiled_grads, eager_grads, twin_grads = results
    for name, a, b, c in zip(
        ["dx", "dkernel", "dbias"],
        compiled_grads,
        eager_grads,
        twin_grads,
        strict=True,
    ):
        assert_close(to_numpy(a), to_numpy(b), FLOAT64_RTOL, name)
        assert_close(to_numpy(a), to_numpy(c), FLOAT64_RTOL, f"{name}, twin")


@torch_only
@pytest.mark.parametrize("tune", ["0", "1"])
def test_torch_untraced_rule_passes_opcheck(tune, monkeypatch):
    """The op the compiled backward pass calls (``_backend.untraced``)
    passes torch's own checks of a custom op: its fake result has the real
    one's shape, dtype and strides (a form may return a transposed view;
    Inductor asserts the strides), with static and dynamic sizes."""

    from keras_rotconv import _tuning

    monkeypatch.setenv("KERAS_ROTCONV_TUNE", tune)
    monkeypatch.setattr(_tuning, "MIN_PRODUCTS", 0)  # time even these
    _tuning.forget()
    try:
        _opcheck_untraced_rule()
    finally:
        _tuning.forget()


def _opcheck_untraced_rule():
    """opcheck of both rules, at stride 1 and 2, on float64 tensors."""
    import torch

    from keras_rotconv._backend import torch as torch_seam

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((2, 9, 8, 3)))
    w = torch.tensor(rng.standard_normal((3, 2, 3, 4)))
    for strides, padding in [((1, 1), "valid"), ((2, 2), "same")]:
        pairs = ops.padding_pairs(
            x.shape[1:3], (3, 2), strides, (1, 1), padding
        )
        lengths = [
            ops.output_size(n, k, s, 1, pair)
            for n, k, s, pair in zip(x.shape[1:3], (3, 2), strides, pairs)
        ]
        delta = torch.tensor(rng.standard_normal((2, *lengths, 4)))
        flat = [v for pair in pairs for v in pair]
        for name, a, b, sizes, shape in [
            ("_cheapest_kernel_gradient", x, delta, [3, 2], [3, 2, 3, 4]),
            ("_cheapest_input_delta", delta, w, [9, 8], list(x.shape)),
        ]:
            args = (
                f"keras_rotconv.ops:{name}",
                shape,
                a,
                b,
                sizes,
                list(strides),
                flat,
                [1, 1],
                1,
            )
            torch.library.opcheck(torch_seam._untraced_rule, args)


@torch_only
def test_torch_compile_with_dynamic_sizes():
    """With dynamic shapes, sizes reach the padding arithmetic as symbolic
    ints; one compiled function meets three input sizes. (Inductor in torch
    2.13 cannot lower the forward convolution of "same" padding with stride
    2 on symbolic spatial sizes, hence "aot_eager"; model.fit keeps spatial
    sizes static.)"""
    import torch

    config = dict(filters=4, kernel_size=3, strides=2, padding="same")
    rot, twin = make_twins(
        *LAYERS[2], dict(config, dtype="float64"), (None, None, None, 3)
    )

    def loss(layer, x):
        y = layer(x)
        return (y * torch.cos(y)).sum()

    compiled = torch.compile(
        lambda x: loss(rot, x),
        dynamic=True,
        fullgraph=True,
        backend="aot_eager",
    )
    rng = np.random.default_rng(0)
    for shape in [(2, 9, 6, 3), (1, 4, 5, 3), (3, 11, 11, 3)]:
        x = rng.standard_normal(shape)
        grads = []
        for layer, run in [(rot, compiled), (twin, lambda x: loss(twin, x))]:
            xt = torch.tensor(x, requires_grad=True)
            variables = [v.value for v in layer.trainable_variables]
            grads.append(torch.autograd.grad(run(xt), [xt, *variables]))
        for name, a, b in zip(["dx", "dkernel", "dbias"], *grads, strict=True):
            assert_close(to_numpy(a), to_numpy(b), FLOAT64_RTOL, name)


def test_the_suite_runs_on_the_requested_backend():
    """CI runs the suite once per KERAS_BACKEND; each run must really be on
    that backend, in the layers' seam too."""
    requested = os.environ.get("KERAS_BACKEND", "tensorflow")
    assert keras.backend.backend() == requested == _backend._BACKEND
