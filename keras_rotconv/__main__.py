"""``python -m keras_rotconv``: the same as the ``keras-rotconv`` command."""

from keras_rotconv.cli import main

raise SystemExit(main())
