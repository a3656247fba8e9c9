"""keras-rotconv: Keras convolution layers whose backward pass is the derived
rotated-kernel convolution."""

from keras_rotconv import ops, reference, rules
from keras_rotconv.convert import ConversionReport, convert
from keras_rotconv.family import (
    RotConv1DTranspose,
    RotConv2DTranspose,
    RotConv3DTranspose,
    RotDepthwiseConv1D,
    RotDepthwiseConv2D,
    RotSeparableConv1D,
    RotSeparableConv2D,
)
from keras_rotconv.layers import RotConv1D, RotConv2D, RotConv3D
from keras_rotconv.ops import textbook_rules

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "RotConv1D",
    "RotConv1DTranspose",
    "RotConv2D",
    "RotConv2DTranspose",
    "RotConv3D",
    "RotConv3DTranspose",
    "RotDepthwiseConv1D",
    "RotDepthwiseConv2D",
    "RotSeparableConv1D",
    "RotSeparableConv2D",
    "__version__",
    "convert",
    "ops",
    "reference",
    "rules",
    "textbook_rules",
]
