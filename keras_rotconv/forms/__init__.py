"""Cheaper forms of the rules in ``keras_rotconv.rules``, each equal to the
rule it replaces: the same sums, computed with fewer products, copies or
layout changes.

``phases``: a strided axis split into its phases (the input delta without
the zeros of ``spread``, the kernel gradient without a dilated window).
``sums``: kernel gradients whose correlation is a plain sum of products
(a 1x1 kernel, a depthwise kernel at stride 1), or matrix products per
tap. ``layouts``: the kernel gradient's convolution with the input's
channels as one more spatial axis.

``keras_rotconv.ops`` chooses among them; ``keras_rotconv.textbook_rules()``
turns them all off.
"""
