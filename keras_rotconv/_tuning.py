"""Choosing among equal forms of a rule by timing them, once per shape.

Which form of the kernel gradient runs fastest (one convolution, or a
matrix product per tap) depends on the shape, the backend and the CPU:
with TensorFlow's oneDNN kernels on, the products win at most shapes; with
them off, the convolution (benchmarks/results/README.md, "Measured
figures"). So, as ``torch.backends.cudnn.benchmark`` does for torch's own
convolutions, the first time a shape is met each form is timed on random
tensors of that shape, and the fastest is kept for every later call. The
forms compute the same sums (tests/test_rules.py holds each to its rule in
float64), so the choice changes the values by rounding only.

Only shapes with enough work are timed (``MIN_PRODUCTS``); smaller ones,
code the backend does not time (TensorFlow under ``jit_compile=True``,
see ``_backend.times_forms``), and ``KERAS_ROTCONV_TUNE=0`` in the
environment, take the first form. JAX compiles each form on its own while
the step is traced and drops one whose compiled memory passes
``MEMORY_MARGIN`` times the first form's (``_backend/jax.py``).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence

from keras_rotconv import _backend

# Multiply-adds in the kernel gradient below which the first form is taken
# untimed: timing costs more than it could save.
MIN_PRODUCTS = 10**7

# Another form replaces the first (the convolution) only if it took at
# most this fraction of its time: a near tie is left to the convolution,
# whose memory is the built-in layer's (a tap product's strided window is a
# copy), and timing noise does not flip the choice from run to run.
MARGIN = 0.9

# The batch timed where the layer's batch is only known when a graph runs
# (Keras traces ``fit`` for any batch size).
STAND_IN_BATCH = 64

_chosen: dict = {}
_lock = threading.RLock()


def enabled() -> bool:
    """Whether forms are timed: the backend times them and
    ``KERAS_ROTCONV_TUNE`` is not ``0``."""
    return (
        os.environ.get("KERAS_ROTCONV_TUNE", "1") != "0"
        and _backend.times_forms()
    )


def shapes_to_time(x, delta, kernel_size: Sequence[int]):
    """The shapes of ``x`` and ``delta`` to time the kernel gradient's forms
    on, or None where it is not worth timing (or cannot be: a spatial size
    known only when a graph runs)."""
    if not enabled():
        return None
    batch = x.shape[0] if x.shape[0] is not None else STAND_IN_BATCH
    rest = (*x.shape[1:], *delta.shape[1:])
    if not all(isinstance(v, int) for v in rest):
        return None
    products = (
        batch
        * math.prod(delta.shape[1:])
        * math.prod(kernel_size)
        * x.shape[-1]
    )
    if products < MIN_PRODUCTS:
        return None
    return (batch, *x.shape[1:]), (batch, *delta.shape[1:])


def fastest(key, forms: dict[str, Callable], shapes, dtype) -> Callable:
    """The form in ``forms`` (name to ``form(x, delta)``) that ran fastest on
    random tensors of ``shapes`` and ``dtype`` (the first unless another
    took at most ``MARGIN`` of its time), timed the first time ``key`` is
    met. If timing fails, the first form, with a warning: the
    forms are equal, so only speed is lost."""
    with _lock:
        if key in _chosen:
            return forms[_chosen[key]]
        names = list(forms)
        try:
            seconds = _time(forms, shapes, dtype)
            name = min(names, key=seconds.__getitem__)
            if seconds[name] > MARGIN * seconds[names[0]]:
                name = names[0]
        except Exception as error:  # only speed is at stake: see above
            warnings.warn(
                f"keras_rotconv could not time the forms of {key[0]} for "
                f"shapes {shapes} ({type(error).__name__}: {error}); it "
                f"uses {names[0]!r}.",
                RuntimeWarning,
                stacklevel=2,
            )
            name = names[0]
        _chosen[key] = name
        return forms[name]


def _time(forms: dict[str, Callable], shapes, dtype) -> dict[str, float]:
    """The seconds each form took (``_backend.time_forms``), by name."""
    names = list(forms)
    seconds = _backend.time_forms(
        [forms[name] for name in names], shapes, dtype
    )
    return dict(zip(names, seconds))


def chosen() -> dict:
    """A copy of the choices made so far: key to form name."""
    with _lock:
        return dict(_chosen)


def forget() -> None:
    """Drop every choice made, so that each shape is timed again."""
    with _lock:
        _chosen.clear()
