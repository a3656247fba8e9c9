"""The textbook rules and the cheaper forms beside them.

Each form in ``keras_rotconv.forms`` is compared directly with the
``keras_rotconv.rules`` function it replaces, in float64, on whichever
backend ``KERAS_BACKEND`` selects. The cases are a covering design rather
than a full product: every rank meets strides, dilation, groups, a depthwise
kernel and every padding, and every form meets every rank it applies to.
``keras_rotconv.textbook_rules()`` is checked to run the rules alone and to
give the same gradients as the default forms.
"""

import contextlib
import itertools

import keras
import numpy as np
import pytest
from conftest import (
    LAYERS,
    assert_close,
    gradients,
    make_twins,
    penalty_gradients,
    to_numpy,
)

import keras_rotconv
from keras_rotconv import ops, rules
from keras_rotconv.forms import layouts, phases, sums

# The form and the rule add the same products in a different order (or, for
# the phases, leave out products with an inserted zero): float64 rounding of
# sums of a few hundred terms, relative to the largest entry.
FORM_RTOL = 1e-12

# (x shape, kernel, strides, dilation, padding, groups, C_out)
CASES = {
    "1d-s2-same": ((2, 11, 3), (3,), (2,), (1,), "same", 1, 4),
    "1d-d2-causal-depthwise": ((2, 10, 4), (3,), (1,), (2,), "causal", 4, 8),
    "1d-1x1": ((2, 9, 2), (1,), (1,), (1,), "valid", 1, 3),
    "1d-s3-k2-depthwise": ((2, 12, 3), (2,), (3,), (1,), "valid", 3, 6),
    "2d-s21-same-g2": ((2, 7, 8, 4), (3, 2), (2, 1), (1, 1), "same", 2, 6),
    "2d-d21-depthwise": ((2, 9, 8, 3), (3, 3), (1, 1), (2, 1), "same", 3, 3),
    "2d-1x1-g2": ((2, 8, 9, 4), (1, 1), (1, 1), (1, 1), "valid", 2, 4),
    "2d-s32-k43-valid": ((1, 10, 9, 2), (4, 3), (3, 2), (1, 1), "valid", 1, 3),
    "2d-s23-d21-g2": ((2, 11, 10, 4), (3, 2), (2, 3), (2, 1), "same", 2, 4),
    "3d-s212-same": ((1, 6, 5, 7, 2), (2, 3, 2), (2, 1, 2), (1, 1, 1), "same",
                     1, 3),
    "3d-d121-depthwise": ((2, 5, 6, 5, 4), (2, 2, 2), (1, 1, 1), (1, 2, 1),
                          "valid", 4, 4),
    "3d-s131-g2": ((1, 7, 6, 5, 4), (3, 1, 2), (1, 3, 1), (1, 1, 1), "same",
                   2, 4),
    "1d-d3-causal": ((2, 12, 2), (3,), (1,), (3,), "causal", 1, 3),
    "2d-d12-same": ((2, 9, 8, 3), (3, 2), (1, 1), (1, 2), "same", 1, 4),
    "3d-k232-valid": ((2, 6, 5, 6, 2), (2, 3, 2), (1, 1, 1), (1, 1, 1),
                      "valid", 1, 3),
}  # fmt: skip


def _case(name, seed=0):
    """``x``, ``w``, a delta and the rules' keyword arguments for a case."""
    shape, kernel, strides, dilation, padding, groups, cout = CASES[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((*kernel, shape[-1] // groups, cout))
    spatial = shape[1:-1]
    pairs = ops.padding_pairs(spatial, kernel, strides, dilation, padding)
    lengths = [
        ops.output_size(n, k, s, d, pair)
        for n, k, s, d, pair in zip(spatial, kernel, strides, dilation, pairs)
    ]
    delta = rng.standard_normal((shape[0], *lengths, cout))
    args = dict(strides=strides, pairs=pairs, dilation=dilation, groups=groups)
    return x, w, delta, args


def _names(applies):
    return [name for name in CASES if applies(name)]


def _strided_undilated(name):
    _, _, strides, dilation, *_ = CASES[name]
    return phases.applies_to_input_delta(strides, dilation)


def _pointwise(name):
    shape, kernel, strides, dilation, padding, *_ = CASES[name]
    pairs = ops.padding_pairs(shape[1:-1], kernel, strides, dilation, padding)
    return sums.is_pointwise(kernel, strides, pairs)


def _depthwise(name):
    shape, _, strides, _, _, groups, _ = CASES[name]
    return groups > 1 and shape[-1] == groups and max(strides) == 1


@pytest.mark.parametrize("name", _names(_strided_undilated))
def test_input_delta_by_phases_equals_the_rule(name):
    x, w, delta, args = _case(name)
    del args["dilation"]
    expected = rules.input_delta(
        delta, w, x.shape[1:-1], dilation=(1,) * (x.ndim - 2), **args
    )
    actual = phases.input_delta_by_phases(delta, w, x.shape[1:-1], **args)
    assert_close(to_numpy(actual), to_numpy(expected), FORM_RTOL, name)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_gradient_by_phases_equals_the_rule(name):
    """On every case: with no strided axis it is the rule in the backend's
    layout (TensorFlow's group blocks and pre-padding)."""
    x, w, delta, args = _case(name)
    kernel = w.shape[:-2]
    expected = rules.kernel_gradient(x, delta, kernel, **args)
    actual = phases.kernel_gradient_by_phases(x, delta, kernel, **args)
    assert_close(to_numpy(actual), to_numpy(expected), FORM_RTOL, name)


@pytest.mark.parametrize("name", _names(_pointwise))
def test_pointwise_kernel_gradient_equals_the_rule(name):
    x, w, delta, args = _case(name)
    expected = rules.kernel_gradient(x, delta, w.shape[:-2], **args)
    actual = sums.kernel_gradient_pointwise(
        keras.ops.convert_to_tensor(x),
        keras.ops.convert_to_tensor(delta),
        args["groups"],
    )
    assert_close(to_numpy(actual), to_numpy(expected), FORM_RTOL, name)


@pytest.mark.parametrize("name", _names(_depthwise))
def test_depthwise_tap_sums_equal_the_rule(name):
    x, w, delta, args = _case(name)
    kernel = w.shape[:-2]
    expected = rules.kernel_gradient(x, delta, kernel, **args)
    actual = sums.kernel_gradient_depthwise(
        x, delta, kernel, args["pairs"], args["dilation"]
    )
    assert_close(to_numpy(actual), to_numpy(expected), FORM_RTOL, name)


def _one_group(name):
    return CASES[name][5] == 1


def _one_group_flat(name):
    x, w, delta, args = _case(name)
    return _one_group(name) and sums.is_flat(
        x, delta, w.shape[:-2], args["strides"], args["pairs"], args["dilation"]
    )


def _with_rule_args(form):
    """``form(x, delta, kernel, strides, pairs, dilation)`` called as
    ``(x, delta, kernel, the case's rule arguments)``."""
    return lambda x, delta, kernel, args: form(
        x, delta, kernel, args["strides"], args["pairs"], args["dilation"]
    )


# The kernel gradient's one-group forms, called as (x, delta, kernel, the
# case's rule arguments), and the cases each applies to.
KERNEL_GRADIENT_FORMS = {
    "tap products": (_with_rule_args(sums.kernel_gradient_by_taps), _one_group),
    "flat tap products": (
        lambda x, delta, kernel, args: sums.kernel_gradient_by_flat_taps(
            x, delta, kernel, args["pairs"], args["dilation"]
        ),
        _one_group_flat,
    ),
    "tap rows": (_with_rule_args(sums.kernel_gradient_by_rows), _one_group),
    "convolution over channels": (
        _with_rule_args(layouts.kernel_gradient_over_channels),
        lambda name: _one_group(name) and not name.startswith("3d"),
    ),
}


@pytest.mark.parametrize(
    "form, name",
    [
        (form, name)
        for form, (_, applies) in KERNEL_GRADIENT_FORMS.items()
        for name in _names(applies)
    ],
)
def test_kernel_gradient_forms_equal_the_rule(form, name):
    x, w, delta, args = _case(name)
    kernel = w.shape[:-2]
    expected = rules.kernel_gradient(x, delta, kernel, **args)
    actual = KERNEL_GRADIENT_FORMS[form][0](
        keras.ops.convert_to_tensor(x),
        keras.ops.convert_to_tensor(delta),
        kernel,
        args,
    )
    assert_close(to_numpy(actual), to_numpy(expected), FORM_RTOL, name)


@pytest.mark.parametrize("name", list(CASES))
def test_every_kernel_gradient_form_offered_equals_the_rule(name):
    """The forms ``ops.kernel_gradient`` times and chooses among, as the
    seam offers them for this case (names wired to the right functions,
    with the right arguments)."""
    x, w, delta, args = _case(name)
    kernel = w.shape[:-2]
    expected = to_numpy(rules.kernel_gradient(x, delta, kernel, **args))
    x, delta = map(keras.ops.convert_to_tensor, (x, delta))
    forms = ops._kernel_gradient_forms(
        x,
        delta,
        kernel,
        args["strides"],
        args["pairs"],
        args["dilation"],
        args["groups"],
    )
    assert forms, name
    for form, compute in forms.items():
        actual = to_numpy(compute(x, delta))
        assert_close(actual, expected, FORM_RTOL, f"{name}: {form}")


@pytest.mark.parametrize(
    "strides", [(2,), (3,), (2, 2), (3, 2), (1, 3), (2, 1, 3)]
)
@pytest.mark.parametrize("differentiated", [False, True])
def test_interleave_puts_every_phase_back(strides, differentiated):
    """``interleave`` moves entry ``m`` of phase ``r`` to position
    ``m·s + r`` on every axis, for equal and unequal strides, in 1, 2 and 3
    dimensions, and consumes the list it is given; on torch both ways:
    written in place, and stacked where autograd records the phases."""
    if differentiated and keras.backend.backend() != "torch":
        pytest.skip("only torch interleaves phases two ways")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, *(3 * s for s in strides), 5))
    split = [
        keras.ops.convert_to_tensor(
            x[(slice(None), *(slice(r, None, s) for r, s in zip(q, strides)))]
        )
        for q in itertools.product(*map(range, strides))
    ]
    with contextlib.ExitStack() as stack:
        if differentiated:
            import torch

            stack.enter_context(torch.enable_grad())
            split = [p.clone().requires_grad_() for p in split]
        merged = phases.interleave(split, strides)
    if differentiated:
        assert merged.requires_grad
        merged = merged.detach()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(merged), x)
    assert split == []


def test_the_flat_form_needs_a_delta_position_per_window():
    """An empty output's delta gets one zero position
    (``_shapes.at_least_one_position``); the flat frame would then be
    smaller than the delta, so the form does not apply there."""
    x = np.zeros((2, 2, 2, 3))
    pairs, one = ((0, 0), (0, 0)), (1, 1)
    padded_empty = np.zeros((2, 1, 1, 4))
    assert not sums.is_flat(x, padded_empty, (3, 3), one, pairs, one)
    assert sums.is_flat(x, np.zeros((2, 1, 1, 4)), (2, 2), one, pairs, one)
    assert not sums.is_flat(
        x, np.zeros((2, 1, 1, 4)), (2, 2), (2, 2), pairs, one
    )


def test_every_form_is_tested_on_every_rank():
    """The covering design reaches each form in 1, 2 and 3 dimensions."""
    for applies in (
        _strided_undilated,
        _pointwise,
        _depthwise,
        _one_group,
        _one_group_flat,
    ):
        ranks = {len(CASES[name][0]) - 2 for name in _names(applies)}
        assert ranks >= ({1, 2} if applies is _pointwise else {1, 2, 3})


# Layer configurations whose default backward pass takes each form: the
# phases (strided), the depthwise tap sums, the 1x1 product, and the rule
# itself (dilated).
LAYER_CASES = {
    "1d-s2-causal": (1, dict(kernel_size=3, strides=2, padding="causal")),
    "1d-1x1": (1, dict(kernel_size=1)),
    "2d-s2-same-g2": (2, dict(kernel_size=3, strides=2, padding="same")),
    "2d-depthwise": (2, dict(kernel_size=3, padding="same", groups=2)),
    "2d-d2-valid": (2, dict(kernel_size=2, dilation_rate=2)),
    "3d-s212": (3, dict(kernel_size=(2, 3, 2), strides=(2, 1, 2))),
}
LAYER_SHAPES = {1: (2, 9, 2), 2: (2, 7, 6, 2), 3: (1, 5, 4, 5, 2)}


def _layer(name):
    rank, config = LAYER_CASES[name]
    config = dict(config, filters=4, dtype="float64")
    rot, _ = make_twins(*LAYERS[rank], config, LAYER_SHAPES[rank])
    rng = np.random.default_rng(1)
    x = rng.standard_normal(LAYER_SHAPES[rank])
    upstream = rng.standard_normal(rot.compute_output_shape(x.shape))
    return rot, x, upstream


def _clear_torch_gradients(layer):
    """torch adds each backward pass's gradients to the variables' ``.grad``;
    the helpers read them from there."""
    for variable in layer.trainable_variables:
        if hasattr(variable.value, "grad"):
            variable.value.grad = None


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_textbook_gradients_equal_the_default_ones(name):
    """First and second order (a gradient penalty), in float64."""
    rot, x, upstream = _layer(name)
    results = []
    for mode in (contextlib.nullcontext, keras_rotconv.textbook_rules):
        with mode():
            _clear_torch_gradients(rot)
            _, dx, dvars = gradients(rot, x, upstream)
            _clear_torch_gradients(rot)
            penalty = penalty_gradients(rot, x, upstream)
        results.append({"dx": dx, **dvars, "penalty dw": penalty["kernel"]})
    default, textbook = results
    for what, value in default.items():
        assert_close(textbook[what], value, FORM_RTOL, f"textbook {what}")


def _forbid_forms(monkeypatch):
    """Make every function of keras_rotconv.forms raise."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a cheaper form ran inside textbook_rules()")

    for module in (phases, sums):
        for name in dir(module):
            if name.startswith(("input_delta_", "kernel_gradient_")):
                monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_textbook_rules_run_the_rules_only(name, monkeypatch):
    """Inside the switch no form runs, and a strided layer spreads its
    delta with zeros."""
    _forbid_forms(monkeypatch)
    spread_calls = []
    spread = rules.spread

    def recorded_spread(delta, strides):
        spread_calls.append(tuple(strides))
        return spread(delta, strides)

    monkeypatch.setattr(rules, "spread", recorded_spread)
    rot, x, upstream = _layer(name)
    with keras_rotconv.textbook_rules():
        gradients(rot, x, upstream)
    strided = max(rot.strides) > 1
    assert any(max(s) > 1 for s in spread_calls) == strided, spread_calls


def test_the_switch_is_restored_and_the_forms_return():
    """Leaving the block (also by an exception) brings the forms back."""
    with pytest.raises(RuntimeError):
        with keras_rotconv.textbook_rules():
            assert ops._textbook()
            raise RuntimeError
    assert not ops._textbook()


def test_a_layer_called_in_the_block_keeps_the_textbook_backward(monkeypatch):
    """The choice is read when the layer is called: a gradient taken after
    the block of a forward pass inside it is still textbook (torch's
    autograd runs the backward pass later)."""
    if keras.backend.backend() != "torch":
        pytest.skip("only torch runs a forward and its backward apart")
    import torch

    rot, x, upstream = _layer("2d-s2-same-g2")
    xt = torch.tensor(x, requires_grad=True)
    with keras_rotconv.textbook_rules():
        y = rot(xt)
    _forbid_forms(monkeypatch)
    (y * torch.as_tensor(upstream, device=y.device)).sum().backward()
    assert xt.grad is not None


def test_verify_runs_the_grid_with_the_textbook_rules(monkeypatch):
    """``keras-rotconv verify --textbook``: the comparison with Keras's
    Conv2D passes with no form running."""
    import io

    from keras_rotconv.tools import verify

    _forbid_forms(monkeypatch)
    cases = [
        verify.Case(strides=(2, 2), padding="same", spatial=(10, 9)),
        verify.Case(dtype="float64", dilation_rate=(2, 2), groups=2),
    ]
    assert verify.run(cases, file=io.StringIO(), textbook=True) == 0


def test_a_traced_function_takes_the_choice_made_when_it_is_traced(
    monkeypatch,
):
    """A tf.function traced inside the block runs the rules only, and gives
    the default gradients."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.function is TensorFlow's (jax.jit: test above)")
    import tensorflow as tf

    rot, x, upstream = _layer("2d-s2-same-g2")
    _, dx_default, _ = gradients(rot, x, upstream)

    @tf.function
    def input_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(rot(x) * upstream)
        return tape.gradient(loss, x)

    _forbid_forms(monkeypatch)
    with keras_rotconv.textbook_rules():
        dx = input_gradient(tf.constant(x))
    assert_close(to_numpy(dx), dx_default, FORM_RTOL, "traced textbook dx")
