"""``keras-rotconv verify``'s options: --rank, --layer, --dtype, --json.

The 2D grid itself, and verify failing on a broken rule, are tested in
test_cli.py; here the options choose what runs, and a few configurations of
the 1D and 3D grids run (each configuration costs about a second under JAX,
which compiles each anew, so not the whole grids).
"""

import dataclasses
import json

import pytest

import keras_rotconv
from keras_rotconv.tools import cli, verify


def test_every_exported_rotconv_layer_has_a_grid_and_an_oracle():
    names = verify.layer_names()
    assert {"RotConv1D", "RotConv2D", "RotConv3D"} <= set(names)
    for name in names:
        assert name in verify.GRIDS, f"verify has no grid for {name}"
        layer_class = getattr(keras_rotconv, name)
        assert verify._oracle_class(layer_class) is verify.ORACLES[name]


@pytest.mark.parametrize(
    "rank, layer, expected",
    [
        (None, None, "RotConv2D"),
        (1, None, "RotConv1D"),
        (3, None, "RotConv3D"),
        (None, "RotConv1D", "RotConv1D"),
        (3, "RotConv3D", "RotConv3D"),
    ],
    ids=["default", "rank-1", "rank-3", "layer", "rank-and-layer"],
)
def test_select_finds_the_layer_and_its_grid(rank, layer, expected):
    layer_class, cases = verify.select(rank, layer)
    assert layer_class is getattr(keras_rotconv, expected)
    assert cases == verify.GRIDS[expected]
    assert all(case.rank == layer_class(1, 1).rank for case in cases)


def test_dtype_runs_every_configuration_in_that_dtype_once():
    _, cases = verify.select(2, dtype="float64")
    assert {case.dtype for case in cases} == {"float64"}
    assert len(set(cases)) == len(cases), "a configuration runs twice"
    for case in verify.GRID:
        converted = dataclasses.replace(case, dtype="float64")
        assert converted in cases, f"{case.name} is not run in float64"


@pytest.mark.parametrize(
    "rank, layer, message",
    [
        (1, "RotConv3D", "not --rank 1"),
        (None, "Conv2D", "no layer Conv2D"),
    ],
    ids=["rank-contradicts-layer", "not-a-rotconv-layer"],
)
def test_select_refuses_contradictions(rank, layer, message):
    with pytest.raises(ValueError, match=message):
        verify.select(rank, layer)


def test_rank_1_in_float64_passes_and_writes_the_json_table(
    tmp_path, monkeypatch, capsys
):
    """Three of the 1D grid's configurations: a stride with "same"
    padding, channels-first, causal padding with dilation and groups."""
    few = [verify.GRID_1D[i] for i in (7, 10, 13)]
    monkeypatch.setitem(verify.GRIDS, "RotConv1D", tuple(few))
    table = tmp_path / "verify.json"
    argv = ["verify", "--rank", "1", "--dtype", "float64", "--json"]
    assert cli.main([*argv, str(table)]) == 0
    out = capsys.readouterr().out
    assert "RotConv1D against keras.layers.Conv1D" in out
    assert f"Table written to {table}\n" in out
    written = json.loads(table.read_text())
    _, cases = verify.select(1, dtype="float64")
    assert written["layer"] == "RotConv1D"
    assert written["agree"] == written["total"] == len(cases)
    assert [row["configuration"] for row in written["rows"]] == [
        case.name for case in cases
    ]
    for row in written["rows"]:
        assert row["result"] == "pass" and row["tolerance"] == 1e-10
        assert set(row["errors"]) == set(verify.QUANTITIES)


def test_3d_layer_passes_a_few_configurations(monkeypatch, capsys):
    """Two of the 3D grid's configurations: groups, and channels-first (the
    oracle between 3D transposes)."""
    few = [verify.GRID_3D[i] for i in (7, 8)]
    assert {c.data_format for c in few} == {"channels_last", "channels_first"}
    monkeypatch.setitem(verify.GRIDS, "RotConv3D", tuple(few))
    assert cli.main(["verify", "--layer", "RotConv3D"]) == 0
    out = capsys.readouterr().out
    assert "RotConv3D against keras.layers.Conv3D" in out
    assert "2 of 2 configurations agree" in out


def test_contradictory_options_exit_1(capsys):
    assert cli.main(["verify", "--rank", "2", "--layer", "RotConv1D"]) == 1
    assert "not --rank 2" in capsys.readouterr().err
