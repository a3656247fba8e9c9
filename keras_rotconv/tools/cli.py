"""The ``keras-rotconv`` command (also ``python -m keras_rotconv``).

    keras-rotconv verify     a RotConv layer against its keras.layers twin
    keras-rotconv train      the example CNN on MNIST or Fashion-MNIST
    keras-rotconv explain    the derivation's steps, worked in numbers
    keras-rotconv convert    a saved model with its convolutions on the rules

Each subcommand is one ``_add_<name>`` function that declares its arguments
and one ``_<name>`` function that runs it and returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "keras-rotconv"

# Modules of the [examples] extra, and what needs them.
_EXTRA_MODULES = {"tensorflow_datasets", "matplotlib"}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns
    the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ModuleNotFoundError as error:
        if error.name not in _EXTRA_MODULES:
            raise
        return _fail(
            f"`{args.command}` needs {error.name}, part of the [examples] "
            "extra: pip install 'keras-rotconv[examples]'"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Keras convolution layers whose backward pass is the "
        "derived rotated-kernel convolution.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND"
    )
    _add_verify(commands)
    _add_train(commands)
    _add_explain(commands)
    _add_convert(commands)
    return parser


def _add_verify(commands) -> None:
    from keras_rotconv.tools import verify

    parser = commands.add_parser(
        "verify",
        help="compare RotConv2D (or another RotConv layer) with its "
        "keras.layers twin over a grid of configurations",
        description="Compares the outputs and gradients (dx, dw, db) of "
        "RotConv2D (or the layer --rank or --layer names) with those of the "
        "built-in Keras layer, same weights and inputs, over a built-in "
        "grid of configurations. Exits with status 1 if any configuration "
        "disagrees.",
    )
    parser.add_argument(
        "--rank",
        type=int,
        choices=(1, 2, 3),
        help="verify RotConv<rank>D (default: 2)",
    )
    parser.add_argument(
        "--layer",
        choices=verify.layer_names(),
        help="verify this keras_rotconv layer",
    )
    parser.add_argument(
        "--dtype",
        choices=verify.DTYPES,
        help="run every configuration in this dtype (default: the grid's "
        "own mix of float32 and float64)",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write the table to FILE as JSON",
    )
    parser.add_argument(
        "--textbook",
        action="store_true",
        help="run the backward pass as the textbook rules only "
        "(keras_rotconv.rules: zeros spread for strides, the kernel "
        "gradient as one convolution)",
    )
    parser.set_defaults(run=_verify)


def _verify(args: argparse.Namespace) -> int:
    import keras

    from keras_rotconv.tools import verify

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Keras compiles its grouped convolution anew for every layer of
        # the grid, and TensorFlow warns about each retracing.
        tf.get_logger().setLevel("ERROR")
    if keras.backend.backend() == "jax":
        import jax

        # Without it JAX computes the float64 configurations in float32.
        jax.config.update("jax_enable_x64", True)
    try:
        layer_class, cases = verify.select(args.rank, args.layer, args.dtype)
    except ValueError as error:
        return _fail(str(error))
    return verify.run(
        cases, layer_class, json_path=args.json, textbook=args.textbook
    )


def _add_train(commands) -> None:
    from keras_rotconv.tools import distribute, models

    parser = commands.add_parser(
        "train",
        help="train the example RotConv2D CNN on MNIST or Fashion-MNIST",
        description="Trains the example RotConv2D CNN with model.fit, "
        "saves the model and its figures under --output, and prints the "
        "test accuracy as its last line.",
    )
    parser.add_argument(
        "--dataset", choices=("mnist", "fashion_mnist"), default="mnist"
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        help="default: "
        + ", ".join(f"{k} {v}" for k, v in models.EPOCHS.items()),
    )
    parser.add_argument(
        "--manual-dir",
        metavar="DIR",
        help="a folder holding the four original IDX .gz files of the data "
        "set, used instead of downloading them",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where TensorFlow Datasets keeps the prepared data (default: "
        "its own, ~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        default="rotconv-output",
        help="where the model and the figures go (default: %(default)s)",
    )
    parser.add_argument(
        "--train-size",
        type=_positive_int,
        metavar="N",
        help="train on the first N training images only",
    )
    parser.add_argument(
        "--test-size",
        type=_positive_int,
        metavar="N",
        help="evaluate on the first N test images only",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=models.BATCH_SIZE
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategy",
        choices=distribute.STRATEGIES,
        help="train data-parallel: 'mirrored' over this machine's GPUs (its "
        "CPU if none), 'multiworker' over the machines that the TF_CONFIG "
        "environment variable lists, each running this same command; "
        "--batch-size is then the global batch (default: one device)",
    )
    parser.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from keras_rotconv.tools import data, distribute, training

    data.quiet()
    try:
        outcome = training.train(
            args.dataset,
            epochs=args.epochs,
            manual_dir=args.manual_dir,
            data_dir=args.data_dir,
            output=args.output,
            train_size=args.train_size,
            test_size=args.test_size,
            batch_size=args.batch_size,
            seed=args.seed,
            strategy=args.strategy,
        )
    except (data.DataUnavailableError, distribute.StrategyError) as error:
        return _fail(str(error))
    for path in outcome.files:
        print(f"wrote {path}")
    print(f"test accuracy: {outcome.test_accuracy:.4f}")
    return 0


def _add_explain(commands) -> None:
    from keras_rotconv.tools import explain

    parser = commands.add_parser(
        "explain",
        help="the derivation worked in numbers, step by step",
        description="Works the derivation's steps on a small example: the "
        "layer as an MLP whose transposed matrix is the rotated kernel "
        "(mlp), the input delta by the chain rule and as the full "
        "convolution with rot180(w) (delta), the kernel gradient as a valid "
        "correlation (kernel), the bias gradient (bias) and two layers with "
        "an activation (chain). Each part computes its result two ways and "
        "with the package's own rule; exit status 1 if they disagree.",
    )
    parser.add_argument(
        "--part",
        choices=(*explain.PARTS, "all"),
        default="all",
        help="default: %(default)s",
    )
    defaults = explain.Setup()
    parser.add_argument(
        "--rank", type=int, choices=(1, 2), default=defaults.rank
    )
    parser.add_argument(
        "--size",
        type=_positive_int,
        default=defaults.size,
        help="input positions per axis (default: %(default)s)",
    )
    parser.add_argument(
        "--kernel",
        type=_positive_int,
        default=defaults.kernel,
        help="kernel taps per axis (default: %(default)s)",
    )
    for name in ("stride", "dilation"):
        parser.add_argument(
            f"--{name}",
            type=_positive_int,
            default=getattr(defaults, name),
            help="default: %(default)s (a stride and a dilation above 1 "
            "together are refused, as Keras refuses them)",
        )
    parser.add_argument(
        "--padding", choices=("valid", "same"), default=defaults.padding
    )
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw each part's figure to FILE (PNG); with several "
        "parts, to FILE's name with -<part> added",
    )
    parser.set_defaults(run=_explain)


def _explain(args: argparse.Namespace) -> int:
    from keras_rotconv.tools import explain

    _float64_on_jax()
    try:
        setup = explain.Setup(
            rank=args.rank,
            size=args.size,
            kernel=args.kernel,
            stride=args.stride,
            dilation=args.dilation,
            padding=args.padding,
        )
    except ValueError as error:
        print(f"{PROG} explain: error: {error}", file=sys.stderr)
        return 2
    parts = explain.PARTS if args.part == "all" else (args.part,)
    return explain.run(parts, setup, plot=args.plot)


def _float64_on_jax() -> None:
    """Without it JAX computes float64 arrays in float32."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)


def _add_convert(commands) -> None:
    parser = commands.add_parser(
        "convert",
        help="replace every Keras convolution layer of a saved model by "
        "its twin on the derived rules",
        description="Loads IN (a .keras file), replaces every Keras "
        "convolution layer by its keras_rotconv twin (weights copied), "
        "saves the result to OUT and lists what was converted. Exits with "
        "status 1 if a convolution could not be replaced (one created "
        "inside a layer's own code); OUT is written all the same.",
    )
    parser.add_argument("input", metavar="IN", help="the model, .keras")
    parser.add_argument("output", metavar="OUT", help="where to save, .keras")
    parser.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    import keras

    import keras_rotconv

    model = keras.saving.load_model(args.input, compile=False)
    converted = keras_rotconv.convert(model)
    converted.save(args.output)
    report = converted.rotconv_report
    for name, old, new in report.converted:
        print(f"{name}: {old} -> {new}")
    print(f"{len(report.converted)} layers converted; saved {args.output}")
    if report.not_converted:
        return _fail("not converted: " + ", ".join(report.not_converted))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, received {text}"
        )
    return value


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1
