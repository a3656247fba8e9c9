"""The kernel gradient's form, chosen by timing (``keras_rotconv._tuning``).

Each form the tuner can choose must give the rules' gradients: the winner
is forced here (``_tuning._time`` replaced by one that reports the chosen
form fastest) and the layer's gradients, first and second order, are
compared in float64 with those of ``keras_rotconv.textbook_rules()``. Then
the bookkeeping: a shape is timed once, small shapes and
``KERAS_ROTCONV_TUNE=0`` are not timed, a failed timing warns and takes the
convolution, and a real timing (TensorFlow: while a tf.function is traced)
picks one of the forms.
"""

import numpy as np
import pytest
from conftest import (
    BACKEND,
    FLOAT64_RTOL,
    LAYERS,
    TF_CONV_GRADIENTS,
    assert_close,
    gradients,
    make_twins,
    penalty_gradients,
    tf_gradient_graph_ops,
    to_numpy,
)

import keras_rotconv
from keras_rotconv import _backend, _tuning

# Every form the tuner may be offered, in the order keras_rotconv.ops
# hands them to it.
FORMS = (
    "convolution",
    "one convolution",
    "convolution over channels",
    "tap products, flat",
    "tap products",
    "tap rows",
)

# Same sums, different order: float64 rounding (see test_rules.FORM_RTOL).
FORM_RTOL = 1e-12

# (rank, layer config, input shape).
CASES = {
    "1d-d2-causal": (1, dict(kernel_size=3, dilation_rate=2,
                             padding="causal"), (2, 11, 3)),
    "2d-s2-same": (2, dict(kernel_size=3, strides=2, padding="same"),
                   (2, 9, 8, 3)),
    "2d-k32-valid": (2, dict(kernel_size=(3, 2)), (2, 7, 6, 2)),
    "3d-same": (3, dict(kernel_size=2, padding="same"), (1, 4, 5, 3, 2)),
    # One input channel: the tap rows (∏K·C_in <= filters) are offered.
    "2d-s21-narrow": (2, dict(kernel_size=2, strides=(2, 1)), (2, 7, 6, 1)),
}  # fmt: skip

needs_timing = pytest.mark.skipif(
    not _backend.times_forms(), reason=f"{BACKEND} does not time forms"
)


@pytest.fixture
def tuning(monkeypatch):
    """Every shape timed (no least amount of work), nothing remembered from
    before, the environment's switch unset."""
    monkeypatch.setattr(_tuning, "MIN_PRODUCTS", 0)
    monkeypatch.delenv("KERAS_ROTCONV_TUNE", raising=False)
    _tuning.forget()
    yield
    _tuning.forget()


def _winning(monkeypatch, winner):
    """Make ``winner`` the fastest form; returns the list of timings asked
    for (one entry, the names of the forms offered, per timing)."""
    asked = []

    def time(forms, shapes, dtype):
        asked.append(list(forms))
        return {name: 0.0 if name == winner else 1.0 for name in forms}

    monkeypatch.setattr(_tuning, "_time", time)
    return asked


def _seconds_of(name, seconds):
    """What ``_backend.time_forms`` returns for the forms offered to case
    ``name``: ``seconds[form]``, 1.0 for a form not named."""
    return [seconds.get(form, 1.0) for form in _forms_of(name)]


def _first_choice():
    """The form chosen for the first shape timed."""
    return next(iter(_tuning.chosen().values()))


def _layer(name, dtype="float64", with_twin=False):
    rank, config, shape = CASES[name]
    config = dict(config, filters=4, dtype=dtype)
    rot, twin = make_twins(*LAYERS[rank], config, shape)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    upstream = rng.standard_normal(rot.compute_output_shape(shape))
    if with_twin:
        return rot, twin, x, upstream.astype(dtype)
    return rot, x, upstream.astype(dtype)


def _cleared(rot):
    """``rot`` with no gradient kept from before: torch adds each backward
    pass's into the variables' ``.grad``, where the helpers read them."""
    for variable in rot.trainable_variables:
        if hasattr(variable.value, "grad"):
            variable.value.grad = None
    return rot


def _all_gradients(rot, x, upstream):
    _, dx, dvars = gradients(_cleared(rot), x, upstream)
    _cleared(rot)
    penalty = penalty_gradients(rot, x, upstream)
    return {"dx": dx, **dvars, "penalty dw": penalty["kernel"]}


def _forms_of(name):
    """The forms offered: the rule's one convolution where the first form
    is the phase split (a stride, or TensorFlow's 1D and 3D padding copied
    once the delta exists), the convolution over channels for 1D and 2D
    layers, the flat products at stride 1 only (their phase split raised
    a strided step's peak memory) and the products of strided windows
    elsewhere (each window a copy), the tap rows where their matrix is no
    larger than the delta."""
    rank, config, _ = CASES[name]
    strided = config.get("strides", 1) != 1
    offered = {
        "convolution": True,
        "one convolution": strided or _backend.pads_by_copy(rank),
        "convolution over channels": rank <= 2,
        "tap products": strided,
        "tap products, flat": not strided,
        "tap rows": "narrow" in name,
    }
    return [form for form in FORMS if offered[form]]


@needs_timing
@pytest.mark.parametrize(
    "name, form",
    [(name, form) for name in CASES for form in _forms_of(name)],
)
def test_each_form_gives_the_rules_gradients(name, form, tuning, monkeypatch):
    """Against the textbook rules (first and second order, 1e-12) and the
    built-in layer's own gradients under the backend's autodiff (first
    order, float64 1e-10): an oracle outside this package."""
    asked = _winning(monkeypatch, form)
    rot, twin, x, upstream = _layer(name, with_twin=True)
    with keras_rotconv.textbook_rules():
        expected = _all_gradients(rot, x, upstream)
    actual = _all_gradients(rot, x, upstream)
    # The layer's own kernel gradient is timed first; the second-order
    # pass times others, where fewer forms may be offered.
    assert asked and asked[0] == _forms_of(name), asked
    assert _first_choice() == form
    for what, value in expected.items():
        assert_close(actual[what], value, FORM_RTOL, f"{form}: {what}")
    _, dx_builtin, dvars_builtin = gradients(_cleared(twin), x, upstream)
    assert_close(actual["dx"], dx_builtin, FLOAT64_RTOL, f"{form}: dx")
    for what, value in dvars_builtin.items():
        assert_close(actual[what], value, FLOAT64_RTOL, f"{form}: {what}")


@needs_timing
def test_a_shape_is_timed_once(tuning, monkeypatch):
    asked = _winning(monkeypatch, "tap products, flat")
    rot, x, upstream = _layer("2d-k32-valid")
    gradients(rot, x, upstream)
    gradients(rot, x, upstream)
    assert asked == [_forms_of("2d-k32-valid")]
    assert len(_tuning.chosen()) == 1
    _tuning.forget()
    gradients(rot, x, upstream)
    assert asked == [_forms_of("2d-k32-valid")] * 2


def test_small_shapes_and_the_switch_are_not_timed(monkeypatch):
    """Below ``MIN_PRODUCTS``, with ``KERAS_ROTCONV_TUNE=0``, and on a
    backend that does not time, the convolution is taken untimed."""
    asked = _winning(monkeypatch, "tap products, flat")
    _tuning.forget()
    rot, x, upstream = _layer("2d-k32-valid")
    gradients(rot, x, upstream)  # a few thousand products
    monkeypatch.setattr(_tuning, "MIN_PRODUCTS", 0)
    monkeypatch.setenv("KERAS_ROTCONV_TUNE", "0")
    gradients(rot, x, upstream)
    assert asked == []
    assert _tuning.chosen() == {}
    monkeypatch.delenv("KERAS_ROTCONV_TUNE")
    gradients(rot, x, upstream)
    assert asked == (
        [_forms_of("2d-k32-valid")] if _backend.times_forms() else []
    )


@needs_timing
def test_a_timing_that_fails_warns_and_takes_the_convolution(
    tuning, monkeypatch
):
    def time_forms(forms, shapes, dtype):
        raise RuntimeError("no timer here")

    monkeypatch.setattr(_backend, "time_forms", time_forms)
    rot, x, upstream = _layer("2d-k32-valid")
    with pytest.warns(RuntimeWarning, match="could not time.*no timer here"):
        gradients(rot, x, upstream)
    assert set(_tuning.chosen().values()) == {"convolution"}


@needs_timing
def test_a_real_timing_picks_a_form_with_the_rules_values(tuning):
    """No form forced: the backend times them (TensorFlow: eagerly, while a
    tf.function is traced) and the gradients are the rules', in float32."""
    rot, x, upstream = _layer("2d-k32-valid", "float32")
    with keras_rotconv.textbook_rules():
        _, _, dvars_rules = gradients(rot, x, upstream)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def kernel_gradient(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(rot(x) * upstream)
            return tape.gradient(loss, rot.kernel)

        dw = to_numpy(kernel_gradient(tf.constant(x)))
    else:
        _, _, dvars = gradients(_cleared(rot), x, upstream)
        dw = dvars["kernel"]
    assert set(_tuning.chosen().values()) <= set(FORMS)
    assert len(_tuning.chosen()) == 1
    assert_close(dw, dvars_rules["kernel"], 1e-5, "kernel gradient")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize(
    "name, form",
    [("2d-k32-valid", form) for form in _forms_of("2d-k32-valid")]
    + [("2d-s2-same", "one convolution"), ("2d-s21-narrow", "tap rows")]
    + [("2d-s2-same", "convolution over channels")],
)
def test_no_form_puts_a_convolution_gradient_in_the_graph(
    name, form, tuning, monkeypatch
):
    _winning(monkeypatch, form)
    rot, _, _ = _layer(name, "float32")
    types = tf_gradient_graph_ops(rot, CASES[name][2])
    assert _first_choice() == form
    assert not types & TF_CONV_GRADIENTS, types & TF_CONV_GRADIENTS


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's compiled forms")
def test_jax_times_compiled_forms_and_drops_those_over_the_memory_margin(
    monkeypatch,
):
    """Each form is compiled on its own, even while a step is traced, and
    one whose compiled bytes pass ``MEMORY_MARGIN`` times the first form's
    reports infinite time, so it is never chosen."""
    import jax
    import jax.numpy as jnp

    from keras_rotconv._backend import jax as seam

    sizes = iter([100, 110, 111])
    monkeypatch.setattr(seam, "_bytes", lambda compiled: next(sizes))
    forms = [
        lambda x, d: jnp.sum(x) * d,
        lambda x, d: jnp.sum(x) + d,
        lambda x, d: jnp.sum(x) - d,
    ]
    seconds = []

    @jax.jit
    def step(x):
        seconds.extend(seam.time_forms(forms, [(3, 4), (2,)], "float32"))
        return x

    step(jnp.ones(2))
    assert len(seconds) == 3
    assert all(0 < t < 1 for t in seconds[:2]), seconds
    assert seconds[2] == float("inf")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs")
def test_a_batch_known_only_when_the_graph_runs_is_timed_at_a_stand_in(
    tuning, monkeypatch
):
    """Keras traces ``fit``'s step for any batch size: the forms are timed
    on ``STAND_IN_BATCH`` samples, and the choice serves every batch."""
    import tensorflow as tf

    timed = []

    def time_forms(forms, shapes, dtype):
        timed.append(shapes)
        return _seconds_of("2d-k32-valid", {"tap products, flat": 0.0})

    monkeypatch.setattr(_backend, "time_forms", time_forms)
    rot, x, upstream = _layer("2d-k32-valid", "float32")
    spec = tf.TensorSpec((None, *x.shape[1:]), "float32")

    @tf.function(input_signature=[spec])
    def kernel_gradient(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(rot(x) * upstream)
        return tape.gradient(loss, rot.kernel)

    with keras_rotconv.textbook_rules():
        expected = to_numpy(kernel_gradient.python_function(tf.constant(x)))
    actual = to_numpy(kernel_gradient(tf.constant(x)))
    assert [shapes[0][0] for shapes in timed] == [_tuning.STAND_IN_BATCH]
    assert set(_tuning.chosen().values()) == {"tap products, flat"}
    assert_close(actual, expected, 1e-5, "kernel gradient, any batch")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs")
def test_a_step_xla_compiles_is_not_timed(tuning, monkeypatch):
    """Under ``jit_compile=True`` the convolution is taken untimed (the tap
    products raised XLA's peak memory), and outside it the same shape is
    timed."""
    import tensorflow as tf

    asked = _winning(monkeypatch, "tap products, flat")
    rot, x, upstream = _layer("2d-k32-valid", "float32")

    def kernel_gradient(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(rot(x) * upstream)
        return tape.gradient(loss, rot.kernel)

    compiled = tf.function(kernel_gradient, jit_compile=True)
    dw = to_numpy(compiled(tf.constant(x)))
    assert asked == []
    with keras_rotconv.textbook_rules():
        expected = to_numpy(kernel_gradient(tf.constant(x)))
    assert_close(dw, expected, 1e-5, "kernel gradient under XLA")
    tf.function(kernel_gradient)(tf.constant(x))
    assert asked == [_forms_of("2d-k32-valid")]


@needs_timing
def test_a_near_tie_keeps_the_convolution(tuning, monkeypatch):
    """Another form must take at most ``MARGIN`` of the convolution's
    time."""
    seconds = {"tap products, flat": _tuning.MARGIN + 0.01}
    monkeypatch.setattr(
        _backend,
        "time_forms",
        lambda forms, *_: _seconds_of("2d-k32-valid", seconds),
    )
    rot, x, upstream = _layer("2d-k32-valid")
    gradients(_cleared(rot), x, upstream)
    assert set(_tuning.chosen().values()) == {"convolution"}
    _tuning.forget()
    seconds["tap products, flat"] = _tuning.MARGIN - 0.01
    gradients(_cleared(rot), x, upstream)
    assert set(_tuning.chosen().values()) == {"tap products, flat"}
