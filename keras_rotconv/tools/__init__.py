"""The tools around the library: what the ``keras-rotconv`` command adds.

``import keras_rotconv`` gives the layers and the rules (``layers``,
``ops``, ``reference`` and the backend seam beside them); this subpackage
holds the command line (``cli``), training on MNIST (``training``, ``data``,
``models``, ``plots``, ``distribute``) and the two teaching and checking
commands (``explain``, ``verify``).
"""
