"""The examples in the package's docstrings, and README's code, run.

Every module of ``keras_rotconv`` (tools included) is searched for
docstring examples, which run as doctests with ``np``, ``keras`` and
``keras_rotconv`` at hand, as the examples assume. README's Python block,
the first code a user copies, runs too.
"""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_rotconv

ROOT = Path(__file__).resolve().parents[1]


def modules_with_examples() -> list[str]:
    names = [keras_rotconv.__name__]
    for info in pkgutil.walk_packages(
        keras_rotconv.__path__, prefix=f"{keras_rotconv.__name__}."
    ):
        if not info.name.endswith(".__main__"):  # importing it runs the CLI
            names.append(info.name)
    finder = doctest.DocTestFinder()
    return [
        name
        for name in names
        if any(t.examples for t in finder.find(importlib.import_module(name)))
    ]


MODULES = modules_with_examples()


def test_the_public_api_has_examples():
    for name in ("keras_rotconv.layers", "keras_rotconv.tools.explain"):
        assert name in MODULES, f"{name} has no docstring example"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    extraglobs = {"np": np, "keras": keras, "keras_rotconv": keras_rotconv}
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in doctest.DocTestFinder().find(module, extraglobs=extraglobs):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_readme_code_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no Python block"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
