"""keras-rotconv: Keras convolution layers whose backward pass is the derived
rotated-kernel convolution."""

from keras_rotconv import ops, reference, rules
from keras_rotconv.layers import RotConv1D, RotConv2D, RotConv3D
from keras_rotconv.ops import textbook_rules

__version__ = "0.1.0"

__all__ = [
    "RotConv1D",
    "RotConv2D",
    "RotConv3D",
    "__version__",
    "ops",
    "reference",
    "rules",
    "textbook_rules",
]
