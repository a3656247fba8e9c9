"""The benchmark script keeps working: its quick mode runs every case and
writes a complete JSON report (same-setting ratios, ratios against the
fastest built-in setting, where it ran) and a chart.

It checks the script, not the speed: the quick mode's tiny sizes say
nothing about the ratios (see benchmarks/benchmark.py for the real run).
"""

import json
import math
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "benchmark.py")


RATIO_KEYS = ("time_ratio", "cpu_ratio", "rotconv_ms", "builtin_ms")
ISA_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def _benchmark():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    return benchmark


def _case_names():
    return [case.name for case in _benchmark().CASES]


def _quick_report(script, name, out):
    """Run ``script --quick --out out``: the JSON it writes,
    ``{name}_{backend}_quick.json``, and what it printed."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    backend = keras.backend.backend()
    with open(out / f"{name}_{backend}_quick.json") as f:
        return json.load(f), run.stdout


def test_quick_mode_writes_a_full_report(tmp_path):
    report, stdout = _quick_report(SCRIPT, "benchmark", tmp_path)
    backend = keras.backend.backend()
    assert (tmp_path / f"benchmark_{backend}_quick.png").stat().st_size > 0

    results = report["results"]
    modes = {"tensorflow": [False, True], "jax": [True], "torch": [False]}[
        backend
    ]
    assert report["settings"]["jit_modes"] == modes
    ran = {r["case"] for r in results}
    assert len(results) == len(ran) * len(modes), results
    # Every case either ran or was reported as skipped (a layer that
    # keras_rotconv does not have yet).
    skipped = {
        line.split("'")[1]
        for line in stdout.splitlines()
        if line.startswith("skipped '")
    }
    assert ran | skipped == set(_case_names()), stdout
    assert not ran & skipped
    for r in results:
        fastest = r["against_fastest"]
        for timing in (r, fastest):
            for key in RATIO_KEYS:
                value = timing[key]
                assert math.isfinite(value) and value > 0, (key, r)
            assert len(timing["block_ratios"]) >= 7, r
        by_mode = fastest["builtin_ms_by_mode"]
        assert set(by_mode) == {str(m) for m in modes}, r
        assert fastest["builtin_jit_compile"] in modes, r
        assert by_mode[str(fastest["builtin_jit_compile"])] == min(
            by_mode.values()
        ), r
        if backend == "tensorflow":
            assert r["rotconv_bytes"] > 0 and r["builtin_bytes"] > 0, r
            assert r["memory_ratio"] == r["rotconv_bytes"] / r["builtin_bytes"]
    assert report["settings"]["quick"] is True
    _check_machine(report["machine"], backend)


def _check_machine(machine, backend, script="benchmark.py"):
    """The report says where it ran: CPU, flags, oneDNN, commit, command."""
    assert machine["backend"] == backend
    assert machine["cpu"], machine
    assert set(machine["cpu_flags"]) == set(ISA_FLAGS), machine
    assert all(isinstance(v, bool) for v in machine["cpu_flags"].values())
    onednn = machine["onednn"]
    assert onednn["TF_ENABLE_ONEDNN_OPTS"] == os.environ.get(
        "TF_ENABLE_ONEDNN_OPTS"
    )
    assert onednn["tensorflow_default"] in ("on", "off"), onednn
    assert onednn["effective"] in ("on", "off"), onednn
    if backend == "tensorflow":
        assert onednn["tensorflow_reports"] in ("on", "off"), onednn
    assert f"{script} --quick" in machine["command"], machine
    assert "git_commit" in machine, machine


def test_cases_filter_picks_by_name_or_part():
    benchmark = _benchmark()
    names = [case.name for case in benchmark.CASES]
    parser, _ = benchmark.parse_args([])
    assert benchmark.select_cases(None, parser) == names
    assert benchmark.select_cases([names[0]], parser) == [names[0]]
    picked = benchmark.select_cases(["26X26", "13x13"], parser)
    assert picked == [n for n in names if "26x26" in n or "13x13" in n]
    assert len(picked) == 2, picked
    assert benchmark.select_cases([json.dumps(names[:2])], parser) == names[:2]


def test_cases_filter_refuses_a_pattern_that_matches_nothing(capsys):
    benchmark = _benchmark()
    parser, _ = benchmark.parse_args([])
    with pytest.raises(SystemExit):
        benchmark.select_cases(["3x3", "no such case"], parser)
    assert "no such case" in capsys.readouterr().err


RULE_SCRIPT = os.path.join(ROOT, "benchmarks", "rule_timings.py")


def test_rule_timings_quick_mode_times_every_part(tmp_path):
    """``benchmarks/rule_timings.py`` runs every case and reports each
    part against its built-in counterpart (the script, not the speed)."""
    report, _ = _quick_report(RULE_SCRIPT, "rule_timings", tmp_path)
    assert report["machine"]["backend"] == keras.backend.backend()
    results = report["results"]
    layer_cases = [
        name
        for name in _case_names()
        if "MNIST" not in name  # the models, not one layer
    ]
    assert sorted(results) == sorted(layer_cases)
    for name, result in results.items():
        parts = {row["part"]: row for row in result["parts"]}
        assert "forward" in parts, name
        assert "kernel gradient: textbook rule" in parts, name
        assert any(p.startswith("kernel gradient: ") for p in parts), name
        expected = {"forward", "kernel gradient"}
        if "stem" not in name:  # a first layer: no input delta
            expected.add("input delta")
            assert "input delta: rule" in parts, name
        else:
            assert "input delta: rule" not in parts, name
        assert set(result["builtin_ms"]) == expected, name
        for row in result["parts"]:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        step = result["step"]
        assert math.isfinite(step["ratio"]) and step["ratio"] > 0, name


COMPILE_SCRIPT = os.path.join(ROOT, "benchmarks", "compile_time.py")


def test_compile_time_quick_mode_times_both_twins_alone(tmp_path):
    """``benchmarks/compile_time.py`` compiles each twin in a process of
    its own and reports the first steps, their ratio and, on torch,
    Dynamo's record (the script, not the speed)."""
    report, stdout = _quick_report(COMPILE_SCRIPT, "compile_time", tmp_path)
    _check_machine(
        report["machine"], keras.backend.backend(), "compile_time.py"
    )
    assert report["settings"]["jit_compile"] is True
    (name,) = report["results"]
    assert set(report["results"][name]) == {"empty", "warm"}
    for cache, result in report["results"][name].items():
        for kind in ("rotconv", "builtin"):
            twin = result[kind]
            (run,) = twin["runs"]
            assert len(run["steps_s"]) == report["settings"]["steps"], run
            # The first step compiles (a warm cache holds the compiled
            # code, but the trace runs again): it cannot be as quick as a
            # steady one.
            assert run["steps_s"][0] > max(run["steps_s"][-3:]), run
            assert twin["warm_up_s"] > 0, twin
            if keras.backend.backend() == "torch":
                dynamo = twin["dynamo"]
                assert dynamo["graphs"] >= 1, dynamo
                assert dynamo["seconds"]["bytecode_tracing"] > 0, dynamo
        for part in ("first_step", "warm_up"):
            rot, builtin = (
                result[kind][f"{part}_s"] for kind in ("rotconv", "builtin")
            )
            assert result[f"{part}_ratio"] == rot / builtin, cache
        assert f"{name}, {cache} cache" in stdout
