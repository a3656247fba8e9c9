"""``keras-rotconv verify``: a RotConv layer against Keras's own layer.

For each configuration of a built-in grid, a RotConv layer (RotConv2D unless
``--rank`` or ``--layer`` says otherwise) and the built-in layer it
replaces (``keras.layers.Conv2D``), with the same arguments and the same
weights, see the same input. Their outputs ``y`` and their gradients
``dx``, ``dw``, ``db`` of ``sum(y * u)`` (``u`` a random upstream
gradient, so that every output position carries its own weight) are
compared. The built-in layer is differentiated by the backend's own
automatic differentiation (on TensorFlow, its convolution-gradient kernels),
an implementation independent of the derivation, which makes it the oracle.
Whichever backend ``KERAS_BACKEND`` selects is the one verified.

TensorFlow's CPU convolution supports only channels-last, so for
``channels_first`` the oracle is the channels-last layer applied between two
transposes.

On a GPU, float32 convolutions may run in TF32 (10 mantissa bits), which
torch allows for cuDNN convolutions by default: on an H100 the built-in
Conv2D's dx for a 9x9x4 input came out 3.1e-4 off the float64 result while
RotConv2D's was 2.1e-7 off. Such an error is the GPU's precision setting,
not the derivation's, so each comparison runs with TF32 turned off in the
backend (and the setting restored afterwards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

import keras
import numpy as np
from keras import ops

import keras_rotconv
from keras_rotconv.layers import RotConv2D

# Largest error relative to the oracle's largest magnitude. float64 leaves
# only rounding in different summation orders; float32 rounding of sums of a
# few hundred terms stays well below 1e-5 of their scale.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}

QUANTITIES = ("y", "dx", "dw", "db")


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer configuration: the layer's arguments plus the input it
    sees. The tuples have one entry per spatial axis (2D by default)."""

    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"
    dilation_rate: tuple[int, int] = (1, 1)
    groups: int = 1
    data_format: str = "channels_last"
    dtype: str = "float32"
    use_bias: bool = True
    spatial: tuple[int, int] = (9, 9)
    channels: int = 4
    filters: int = 6
    batch: int = 2
    depth_multiplier: int = 1

    @classmethod
    def of(cls, rank: int, **fields) -> Case:
        """A case of ``rank`` spatial axes, an int standing for the same
        value on every axis."""
        for name in ("kernel_size", "strides", "dilation_rate", "spatial"):
            # The 2D defaults hold one value on both axes.
            value = fields.get(name, getattr(cls, name)[0])
            if isinstance(value, int):
                value = (value,) * rank
            fields[name] = value
        return cls(**fields)

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def name(self) -> str:
        def pair(values):
            return "x".join(map(str, values))

        parts = [
            f"k{pair(self.kernel_size)}",
            f"s{pair(self.strides)}",
            f"d{pair(self.dilation_rate)}",
            self.padding,
            f"g{self.groups}",
            "cf" if self.data_format == "channels_first" else "cl",
            self.dtype,
            f"in{pair(self.spatial)}x{self.channels}",
        ]
        if self.depth_multiplier != 1:
            parts.append(f"m{self.depth_multiplier}")
        if not self.use_bias:
            parts.append("nobias")
        return " ".join(parts)

    def layer_kwargs(self, layer: str = "RotConv2D") -> dict:
        """The arguments of the layer named ``layer``: a depthwise layer
        takes a depth multiplier and no filters, a separable one both, a
        transposed one no groups."""
        kwargs = dict(
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            use_bias=self.use_bias,
            bias_initializer="random_normal",
            dtype=self.dtype,
        )
        if "Depthwise" in layer or "Separable" in layer:
            kwargs["depth_multiplier"] = self.depth_multiplier
        if "Depthwise" not in layer:
            kwargs["filters"] = self.filters
        if not any(
            kind in layer for kind in ("Depthwise", "Separable", "Transpose")
        ):
            kwargs["groups"] = self.groups
        return kwargs


GRID: tuple[Case, ...] = (
    Case(kernel_size=(1, 1)),
    Case(kernel_size=(2, 2)),
    Case(),
    Case(padding="same"),
    Case(kernel_size=(5, 5), padding="same"),
    Case(kernel_size=(2, 3), padding="same", spatial=(8, 7)),
    Case(strides=(2, 2)),
    Case(strides=(2, 2), padding="same", spatial=(10, 9)),
    Case(kernel_size=(4, 4), strides=(3, 3), spatial=(11, 12)),
    Case(kernel_size=(2, 3), strides=(1, 2), padding="same"),
    Case(dilation_rate=(2, 2)),
    Case(dilation_rate=(2, 2), padding="same"),
    Case(kernel_size=(3, 2), dilation_rate=(1, 3), padding="same"),
    Case(groups=2),
    Case(groups=4, filters=8, strides=(2, 2), padding="same"),
    Case(data_format="channels_first"),
    Case(data_format="channels_first", strides=(2, 2), padding="same"),
    Case(use_bias=False),
    Case(dtype="float64"),
    Case(dtype="float64", strides=(2, 2), padding="same", spatial=(10, 9)),
    Case(dtype="float64", dilation_rate=(2, 2), padding="same", groups=2),
    Case(dtype="float64", kernel_size=(4, 4), strides=(3, 3), spatial=(11, 12)),
    Case(dtype="float64", data_format="channels_first", padding="same"),
)

# 1D adds "causal" padding; 3D inputs stay small, each case costing about
# what a 2D one does.
GRID_1D: tuple[Case, ...] = tuple(
    Case.of(1, **{"spatial": 12, **fields})
    for fields in (
        dict(kernel_size=1),
        dict(kernel_size=2),
        dict(),
        dict(kernel_size=5, padding="same"),
        dict(padding="causal"),
        dict(kernel_size=2, dilation_rate=2, padding="causal"),
        dict(strides=2),
        dict(strides=3, padding="same"),
        dict(dilation_rate=2, padding="same"),
        dict(groups=2),
        dict(data_format="channels_first", strides=2, padding="same"),
        dict(use_bias=False),
        dict(dtype="float64", strides=2, padding="same"),
        dict(dtype="float64", dilation_rate=2, groups=2, padding="causal"),
    )
)
GRID_3D: tuple[Case, ...] = tuple(
    Case.of(3, **{"spatial": 6, "channels": 3, "filters": 4, **fields})
    for fields in (
        dict(kernel_size=1),
        dict(kernel_size=2),
        dict(),
        dict(padding="same"),
        dict(kernel_size=(3, 1, 2), padding="same"),
        dict(strides=2, padding="same", spatial=(7, 6, 5)),
        dict(dilation_rate=2),
        dict(groups=3, filters=6),
        dict(data_format="channels_first", padding="same"),
        dict(dtype="float64", strides=2, padding="same"),
        dict(dtype="float64", dilation_rate=(2, 1, 1), padding="same"),
    )
)


def _family_grid(rank: int, *changes: dict) -> tuple[Case, ...]:
    """A short grid for the transposed, depthwise and separable layers:
    the plain case, then one change each. (No dilation for the transposed
    layers: Keras's TensorFlow Conv*DTranspose refuses it on a CPU.)"""
    base = {"spatial": {1: 10, 2: 7, 3: 5}[rank], "channels": 3, "filters": 4}
    return tuple(Case.of(rank, **{**base, **c}) for c in ({}, *changes))


_MOTIONS = (
    dict(padding="same"),
    dict(strides=2),
    dict(strides=2, padding="same", kernel_size=4),
    dict(data_format="channels_first", strides=2, padding="same"),
    dict(use_bias=False, kernel_size=2),
    dict(dtype="float64", strides=2, padding="same"),
)
_DILATED = (
    dict(dilation_rate=2),
    dict(dtype="float64", dilation_rate=2, padding="same"),
)
_MULTIPLIED = (
    dict(depth_multiplier=2),
    dict(dtype="float64", depth_multiplier=3, strides=2),
)

# The grid of each RotConv layer, by class name. A layer joins ``verify``
# with an entry here; its oracle is the built-in layer of ``ORACLES``.
GRIDS: dict[str, tuple[Case, ...]] = {
    "RotConv1D": GRID_1D,
    "RotConv2D": GRID,
    "RotConv3D": GRID_3D,
    **{
        f"RotConv{rank}DTranspose": _family_grid(rank, *_MOTIONS)
        for rank in (1, 2, 3)
    },
    **{
        f"Rot{kind}Conv{rank}D": _family_grid(
            rank, *_MOTIONS, *_DILATED, *_MULTIPLIED
        )
        for kind in ("Depthwise", "Separable")
        for rank in (1, 2)
    },
}
ORACLES: dict[str, type] = {
    name: getattr(keras.layers, name.removeprefix("Rot")) for name in GRIDS
}
DTYPES = tuple(TOLERANCE)


def layer_names() -> list[str]:
    """The RotConv layer classes that ``keras_rotconv`` exports."""
    return [
        name
        for name in keras_rotconv.__all__
        if name.startswith("Rot")
        and isinstance(getattr(keras_rotconv, name), type)
        and issubclass(getattr(keras_rotconv, name), keras.layers.Layer)
    ]


def select(
    rank: int | None = None,
    layer: str | None = None,
    dtype: str | None = None,
) -> tuple[type, tuple[Case, ...]]:
    """The layer class and the cases ``verify`` runs: ``layer`` by name,
    else ``RotConv<rank>D`` (default 2D); every case in ``dtype`` if given.
    Raises ``ValueError`` for a layer without a grid or a rank that
    contradicts the layer.

    >>> layer_class, cases = select(rank=1, dtype="float64")
    >>> layer_class.__name__, {case.dtype for case in cases}
    ('RotConv1D', {'float64'})
    """
    name = layer or f"RotConv{rank or 2}D"
    if name not in layer_names():
        raise ValueError(
            f"keras_rotconv has no layer {name}; it has "
            f"{', '.join(layer_names())}"
        )
    if name not in GRIDS:
        raise ValueError(f"verify has no grid of configurations for {name}")
    cases = GRIDS[name]
    if rank is not None and cases[0].rank != rank:
        raise ValueError(
            f"{name} has {cases[0].rank} spatial axes, not --rank {rank}"
        )
    if dtype is not None:
        if dtype not in TOLERANCE:
            raise ValueError(f"dtype must be one of {DTYPES}")
        converted = (dataclasses.replace(c, dtype=dtype) for c in cases)
        cases = tuple(dict.fromkeys(converted))
    return getattr(keras_rotconv, name), cases


@dataclasses.dataclass(frozen=True)
class Result:
    """Largest relative error of each quantity (None: no bias)."""

    case: Case
    errors: dict[str, float | None]

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.case.dtype]

    def failed(self) -> list[str]:
        """The quantities whose error exceeds the tolerance."""
        return [
            q
            for q, e in self.errors.items()
            if e is not None and not e <= self.tolerance
        ]


def check(case: Case, layer_class: type = RotConv2D, seed: int = 0) -> Result:
    """Runs ``case`` through ``layer_class`` and its built-in twin."""
    rng = np.random.default_rng(seed)
    shape = (case.batch, *case.spatial, case.channels)
    if case.data_format == "channels_first":
        shape = (case.batch, case.channels, *case.spatial)
    x = rng.standard_normal(shape).astype(case.dtype)

    kwargs = case.layer_kwargs(layer_class.__name__)
    oracle = _oracle_class(layer_class)(**kwargs)
    layer = layer_class(**kwargs, data_format=case.data_format)
    oracle.build(_channels_last_shape(shape, case.data_format))
    layer.build(shape)
    layer.set_weights(oracle.get_weights())

    run_oracle = _applier(oracle, case.data_format == "channels_first")
    run_layer = _applier(layer, transpose=False)
    with full_float32_precision():
        u = rng.standard_normal(ops.shape(run_oracle(x))).astype(case.dtype)
        expected = _value_and_gradients(run_oracle, oracle, x, u)
        actual = _value_and_gradients(run_layer, layer, x, u)
    errors = {
        q: None if e is None else _relative_error(a, e)
        for q, a, e in zip(QUANTITIES, actual, expected)
    }
    return Result(case, errors)


def run(
    cases: Sequence[Case] = GRID,
    layer_class: type = RotConv2D,
    file: TextIO | None = None,
    json_path: str | os.PathLike | None = None,
    textbook: bool = False,
) -> int:
    """Prints the comparison table; returns the exit status, 1 on any
    mismatch. With ``json_path``, also writes the table there as JSON.
    ``textbook``: the backward pass runs the rules of
    ``keras_rotconv.rules`` only (``keras_rotconv.textbook_rules()``)."""
    if textbook:
        from keras_rotconv.ops import textbook_rules

        with textbook_rules():
            return run(cases, layer_class, file, json_path)
    file = file or sys.stdout
    width = max(len(c.name) for c in cases)
    header = f"{'configuration':<{width}}  " + "".join(
        f"{q:>9}" for q in QUANTITIES
    )
    print(
        f"{layer_class.__name__} against keras.layers."
        f"{_oracle_class(layer_class).__name__}: largest "
        "error relative to the largest oracle value",
        file=file,
    )
    print(f"{header}  result", file=file)
    failures = 0
    results = []
    for case in cases:
        result = check(case, layer_class)
        results.append(result)
        cells = "".join(
            f"{'-' if e is None else f'{e:.1e}':>9}"
            for e in result.errors.values()
        )
        failed = result.failed()
        verdict = "pass" if not failed else f"FAIL ({', '.join(failed)})"
        failures += bool(failed)
        print(f"{case.name:<{width}}  {cells}  {verdict}", file=file)
    tolerances = ", ".join(f"{d} {t:.0e}" for d, t in TOLERANCE.items())
    print(
        f"{len(cases) - failures} of {len(cases)} configurations agree "
        f"(tolerance: {tolerances}).",
        file=file,
    )
    if json_path is not None:
        write_json(results, layer_class, json_path)
        print(f"Table written to {json_path}", file=file)
    return 1 if failures else 0


def write_json(
    results: Sequence[Result], layer_class: type, path: str | os.PathLike
) -> None:
    """The table as JSON: one row per configuration, with its arguments,
    its errors and the tolerance it was held to."""
    rows = [
        {
            "configuration": r.case.name,
            "case": dataclasses.asdict(r.case),
            "errors": r.errors,
            "tolerance": r.tolerance,
            "failed": r.failed(),
            "result": "FAIL" if r.failed() else "pass",
        }
        for r in results
    ]
    table = {
        "layer": layer_class.__name__,
        "oracle": f"keras.layers.{_oracle_class(layer_class).__name__}",
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "keras_rotconv": keras_rotconv.__version__,
        "agree": sum(not r.failed() for r in results),
        "total": len(results),
        "rows": rows,
    }
    with open(path, "w") as stream:
        json.dump(table, stream, indent=2)
        stream.write("\n")


def _oracle_class(layer_class: type) -> type:
    """The built-in layer that ``layer_class`` replaces: registered in
    ``ORACLES``, else the Keras convolution class it derives from."""
    if layer_class.__name__ in ORACLES:
        return ORACLES[layer_class.__name__]
    for oracle in ORACLES.values():
        if issubclass(layer_class, oracle):
            return oracle
    raise ValueError(f"no built-in layer to compare {layer_class} with")


@contextlib.contextmanager
def full_float32_precision():
    """Turns off TF32 (float32 products rounded to 10 mantissa bits on
    NVIDIA GPUs) in the current backend; restores the setting on exit. No
    effect on a CPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        enabled = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(enabled)
    elif backend == "jax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
    elif backend == "torch":
        import torch

        flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
        saved = [f.allow_tf32 for f in flags]
        for f in flags:
            f.allow_tf32 = False
        try:
            yield
        finally:
            for f, value in zip(flags, saved):
                f.allow_tf32 = value
    else:
        yield


def _channels_last_shape(shape, data_format):
    if data_format == "channels_first":
        return (shape[0], *shape[2:], shape[1])
    return shape


def _applier(layer, transpose: bool):
    """``apply(x, variables=None)``: ``layer(x)``, between transposes from
    and back to channels-first if ``transpose``. Given ``variables``, the
    layer runs on those values of its trainable variables instead of its own
    (JAX differentiates pure functions)."""

    def apply(x, variables=None):
        rank = len(x.shape) - 2
        if transpose:
            x = ops.transpose(x, (0, *range(2, rank + 2), 1))
        if variables is None:
            y = layer(x)
        else:
            y, _ = layer.stateless_call(variables, [], x)
        if transpose:
            y = ops.transpose(y, (0, rank + 1, *range(1, rank + 1)))
        return y

    return apply


def _value_and_gradients(apply, layer, x, u):
    """``y = apply(x)`` and the gradients of ``sum(y * u)`` with respect to
    ``x``, the kernels (one for most layers; a separable layer's depthwise
    and pointwise kernels, concatenated flat) and the bias (None without
    one), by the backend's own automatic differentiation."""
    y, grads = _GRADIENTS[keras.backend.backend()](apply, layer, x, u)
    dx, *by_variable = [ops.convert_to_numpy(g) for g in grads]
    names = [v.path.split("/")[-1] for v in layer.trainable_variables]
    kernels = [g.ravel() for g, n in zip(by_variable, names) if n != "bias"]
    bias = [g for g, n in zip(by_variable, names) if n == "bias"]
    dw = np.concatenate(kernels)
    return [ops.convert_to_numpy(y), dx, dw, bias[0] if bias else None]


def _tf_gradients(apply, layer, x, u):
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = apply(x)
        loss = tf.reduce_sum(y * u)
    return y, tape.gradient(loss, [x, *layer.trainable_variables])


def _jax_gradients(apply, layer, x, u):
    import jax

    def loss(x, variables):
        y = apply(x, variables)
        return (y * u).sum(), y

    # Compiled whole: much faster than running each operation on its own.
    (_, y), (dx, dvars) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(x, [v.value for v in layer.trainable_variables])
    return y, [dx, *dvars]


def _torch_gradients(apply, layer, x, u):
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = apply(x)
    # On a GPU the layer computes on the device it placed its weights on.
    (y * torch.as_tensor(u, device=y.device)).sum().backward()
    variables = layer.trainable_variables
    return y.detach(), [x.grad, *(v.value.grad for v in variables)]


_GRADIENTS = {
    "tensorflow": _tf_gradients,
    "jax": _jax_gradients,
    "torch": _torch_gradients,
}


def _relative_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.max(np.abs(expected))
    if scale == 0:
        return float(np.max(np.abs(actual)))
    return float(np.max(np.abs(actual - expected)) / scale)
