"""``python -m keras_rotconv``: the same as the ``keras-rotconv`` command."""

from keras_rotconv.tools.cli import main

raise SystemExit(main())
