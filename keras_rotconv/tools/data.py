"""MNIST and Fashion-MNIST through TensorFlow Datasets, online or offline.

TFDS downloads the four original IDX files of a data set, checks their size
and sha256, and prepares them once under its data directory. Offline, a
folder holding those four files can stand in for the download (``manual_dir``):
TFDS then reads them from there and still checks them.

Both data sets use the same four file names, and TFDS extracts files by name,
so each data set gets a download and extract directory of its own; with a
shared one, Fashion-MNIST would quietly be prepared from MNIST's extracted
files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tensorflow as tf
import tensorflow_datasets as tfds

DATASETS = ("mnist", "fashion_mnist")
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


class DataUnavailableError(RuntimeError):
    """The data set could neither be downloaded nor read from ``manual_dir``."""


def prepare(
    name: str,
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
    """Makes sure data set ``name`` is prepared under ``data_dir``.

    ``data_dir`` defaults to TFDS's own (``~/tensorflow_datasets`` unless
    ``TFDS_DATA_DIR`` says otherwise). With ``manual_dir``, the four original
    files are read from that folder instead of downloaded.

    Raises:
        ValueError: for an unknown ``name``.
        DataUnavailableError: when the files are missing, not the originals,
            or cannot be downloaded; its message says what to do.
    """
    check_name(name)
    root = Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
    builder = tfds.builder(name, data_dir=os.fspath(root))
    if manual_dir is not None:
        _check_manual_dir(name, Path(manual_dir).expanduser(), builder)
    download_dir = root / "downloads" / name
    config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
        extract_dir=os.fspath(download_dir / "extracted"),
        try_download_gcs=False,
    )
    try:
        builder.download_and_prepare(
            download_dir=os.fspath(download_dir), download_config=config
        )
    except (OSError, tfds.download.DownloadError) as error:
        raise DataUnavailableError(
            f"Could not download {name} through TensorFlow Datasets "
            f"({type(error).__name__}); without network access, pass "
            f"--manual-dir DIR (in Python, manual_dir=DIR), a folder holding "
            f"the four original files {', '.join(_file_names(builder))}."
        ) from error
    return builder


def quiet() -> None:
    """Turns off TFDS's progress bars, which would interleave with Keras's
    progress bar on the console."""
    tfds.disable_progress_bar()


def check_name(name: str) -> None:
    """Raises a ValueError unless ``name`` is one of ``DATASETS``."""
    if name not in DATASETS:
        raise ValueError(
            f"Unknown data set. Expected one of {DATASETS}. Received: "
            f"name={name!r}"
        )


def load(
    name: str,
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """``(train, test)`` batches of ``(image, label)`` from data set ``name``.

    Images are float32 in ``[0, 1]``, shaped ``(28, 28, 1)``; labels are
    integers 0-9. ``train_size`` and ``test_size`` keep only the first that
    many examples of each split (all by default). The training batches are
    shuffled anew every epoch in an order fixed by ``seed``: two pipelines
    made with the same arguments yield the same batches, epoch by epoch.
    """
    for argument, value in (
        ("train_size", train_size),
        ("test_size", test_size),
    ):
        if value is not None and value < 1:
            raise ValueError(
                f"`{argument}` must be a positive integer or None. "
                f"Received: {argument}={value}"
            )
    builder = prepare(name, manual_dir=manual_dir, data_dir=data_dir)
    train = _split(builder, "train", train_size).shuffle(
        _split_size(builder, "train", train_size),
        seed=seed,
        reshuffle_each_iteration=True,
    )
    test = _split(builder, "test", test_size)
    return (
        train.batch(batch_size).prefetch(tf.data.AUTOTUNE),
        test.batch(batch_size).prefetch(tf.data.AUTOTUNE),
    )


def _split(builder, split: str, size: int | None) -> tf.data.Dataset:
    spec = split if size is None else f"{split}[:{size}]"
    dataset = builder.as_dataset(
        split=spec, as_supervised=True, shuffle_files=False
    )
    return dataset.map(_scale, num_parallel_calls=tf.data.AUTOTUNE).cache()


def _split_size(builder, split: str, size: int | None) -> int:
    total = builder.info.splits[split].num_examples
    return total if size is None else min(size, total)


def _scale(image, label):
    return tf.cast(image, tf.float32) / 255.0, label


def _file_names(builder) -> list[str]:
    return sorted(info.filename for info in builder.url_infos.values())


def _check_manual_dir(name: str, folder: Path, builder) -> None:
    """Fails early, and by name, on a file TFDS would reject or try to
    download in its place."""
    expected = sorted(builder.url_infos.values(), key=lambda i: i.filename)
    missing = [
        i.filename for i in expected if not (folder / i.filename).is_file()
    ]
    if missing:
        raise DataUnavailableError(
            f"--manual-dir {folder} lacks {', '.join(missing)}: it must hold "
            f"the four original {name} files {', '.join(_file_names(builder))}."
        )
    for info in expected:
        path = folder / info.filename
        if (
            path.stat().st_size != int(info.size)
            or _sha256(path) != info.checksum
        ):
            raise DataUnavailableError(
                f"--manual-dir {folder}: {info.filename} is not the original "
                f"{name} file (its size or sha256 differs from the one TFDS "
                "registers); put the original file there."
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
