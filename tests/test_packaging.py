"""The package as a user installs it: ``python -m build``'s sdist and wheel,
the wheel installed (not editable) into a fresh virtual environment, and
``keras-rotconv verify`` run from there; the version in one place.

Building and installing does not depend on the Keras backend, so those tests
run under TensorFlow only (the backend the installed command then uses).
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import pytest

import keras_rotconv

ROOT = Path(__file__).resolve().parents[1]

only_once = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="building and installing the wheel does not depend on the "
    "backend: run under TensorFlow only",
)


def test_version_is_the_installed_metadata_and_the_changelog():
    version = keras_rotconv.__version__
    assert importlib.metadata.version("keras-rotconv") == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)}\b", changelog, re.M), (
        f"CHANGELOG.md has no section for {version}"
    )


@pytest.fixture(scope="module")
def distributions(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built as ``python -m build`` builds them
    (the wheel from the unpacked sdist). Without build isolation: the
    build requirements are already installed, and CI has no index to
    fetch them from."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", out],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return {
        "sdist": next(out.glob("*.tar.gz")),
        "wheel": next(out.glob("*.whl")),
    }


def package_modules() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "keras_rotconv").rglob("*.py")
    }


@only_once
def test_the_wheel_holds_every_module_and_no_tests(distributions):
    with zipfile.ZipFile(distributions["wheel"]) as wheel:
        names = set(wheel.namelist())
    missing = package_modules() - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
    assert "keras_rotconv/tools/cli.py" in names
    stray = [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert not stray, f"tests in the wheel: {stray}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(distributions["wheel"]) as wheel:
        scripts = wheel.read(entry_points).decode()
    assert "keras-rotconv = keras_rotconv.tools.cli:main" in scripts
    assert distributions["sdist"].name == (
        f"keras_rotconv-{keras_rotconv.__version__}.tar.gz"
    )


@only_once
def test_verify_runs_from_the_installed_wheel(distributions, tmp_path):
    venv = tmp_path / "venv"
    # The system's packages (keras, TensorFlow) are reused, not downloaded.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", venv],
        check=True,
    )
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KERAS_BACKEND="tensorflow", PIP_NO_INDEX="1")
    wheel = str(distributions["wheel"])
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--force-reinstall",
            wheel,
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    # Run away from the checkout, whose keras_rotconv/ (or an editable
    # install of it) would otherwise be imported instead.
    where = subprocess.run(
        [python, "-c", "import keras_rotconv; print(keras_rotconv.__file__)"],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), f"imported {where}, not the wheel"
    verify = subprocess.run(
        [venv / "bin" / "keras-rotconv", "verify"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "configurations agree" in verify.stdout
