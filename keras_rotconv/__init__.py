"""keras-rotconv: Keras convolution layers whose backward pass is the derived
rotated-kernel convolution."""

from keras_rotconv import ops, reference
from keras_rotconv.layers import RotConv2D

__version__ = "0.1.0"

__all__ = ["RotConv2D", "__version__", "ops", "reference"]
