"""Any Functional or Sequential Keras model with its convolution layers
replaced by their twins on the derived rules.

``convert(model)`` clones the model (its nested Sequential and Functional
sub-models too, layers shared between branches staying shared), builds each
Keras convolution layer's twin from the layer's own configuration, and
copies every weight over exactly. A convolution that cloning cannot reach,
one created inside a subclassed layer's own code, stays what it was: it is
named in a warning and in the report the converted model carries.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import keras

from keras_rotconv import family, layers

# Each built-in convolution layer and its twin. Only these exact classes are
# replaced: a subclass may have changed what `call` computes.
TWINS = {
    keras.layers.Conv1D: layers.RotConv1D,
    keras.layers.Conv2D: layers.RotConv2D,
    keras.layers.Conv3D: layers.RotConv3D,
    keras.layers.Conv1DTranspose: family.RotConv1DTranspose,
    keras.layers.Conv2DTranspose: family.RotConv2DTranspose,
    keras.layers.Conv3DTranspose: family.RotConv3DTranspose,
    keras.layers.DepthwiseConv1D: family.RotDepthwiseConv1D,
    keras.layers.DepthwiseConv2D: family.RotDepthwiseConv2D,
    keras.layers.SeparableConv1D: family.RotSeparableConv1D,
    keras.layers.SeparableConv2D: family.RotSeparableConv2D,
}


class ConversionReport(NamedTuple):
    """What ``convert`` did.

    ``converted``: ``(layer name, built-in class name, twin class name)``
    for each layer replaced; ``not_converted``: the paths (as
    ``outer/inner``) of the Keras convolution layers left in the model, each
    inside a layer whose own code created it, or an instance of a subclass
    of a convolution layer.
    """

    converted: list[tuple[str, str, str]]
    not_converted: list[str]


def convert(model: keras.Model) -> keras.Model:
    """A new model of the same architecture with every Keras convolution
    layer replaced by its twin (``Conv1D/2D/3D``, the transposes, depthwise
    and separable convolutions), weights copied exactly, every other layer
    a clone of the original.

    Returns the new model; its ``rotconv_report`` attribute is the
    ``ConversionReport``. A convolution that could not be replaced is
    named in a ``UserWarning`` as well.

    Raises:
        ValueError: (from ``keras.models.clone_model``) when ``model`` is
            neither Functional nor Sequential: a subclassed model creates
            its layers in its own code.
    """
    pairs = []

    def clone(layer):
        twin = TWINS.get(type(layer))
        config = layer.get_config()
        new = (twin or type(layer)).from_config(config)
        pairs.append((layer, new))
        return new

    converted = keras.models.clone_model(
        model, clone_function=clone, recursive=True
    )
    for old, new in pairs:
        # (Functional models also hold operations, which have no weights.)
        if getattr(old, "weights", None):
            new.set_weights(old.get_weights())
    report = ConversionReport(
        converted=[
            (old.name, type(old).__name__, type(new).__name__)
            for old, new in pairs
            if type(old) in TWINS
        ],
        not_converted=unconverted_convolutions(converted),
    )
    if report.not_converted:
        warnings.warn(
            "keras_rotconv.convert could not replace these convolution "
            "layers (created inside a layer's own code, or subclasses of a "
            "convolution layer); they keep the framework's gradients: "
            + ", ".join(report.not_converted),
            stacklevel=2,
        )
    converted.rotconv_report = report
    return converted


_CONVOLUTIONS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
)
_TWIN_CLASSES = tuple(TWINS.values())


def unconverted_convolutions(model: keras.Layer) -> list[str]:
    """The paths of the Keras convolution layers inside ``model`` that are
    not twins, found through every attribute of every layer."""
    found, seen = [], set()

    def visit(layer, path):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, _CONVOLUTIONS) and not isinstance(
            layer, _TWIN_CLASSES
        ):
            found.append(path)
        for name, child in _sublayers(layer):
            visit(child, f"{path}/{name}")

    visit(model, model.name)
    return found


def _sublayers(layer):
    """``(name, layer)`` for each layer held by ``layer``'s attributes,
    directly or in a list, tuple or dict."""
    for value in vars(layer).values():
        items = value
        if isinstance(value, dict):
            items = value.values()
        elif not isinstance(value, (list, tuple)):
            items = (value,)
        for item in items:
            if isinstance(item, keras.Layer):
                yield item.name, item
