"""The benchmark script keeps working: its quick mode runs every case and
writes a complete JSON report and a chart.

It checks the script, not the speed: the quick mode's tiny sizes say
nothing about the ratios (see benchmarks/benchmark.py for the real run).
"""

import json
import math
import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "benchmark.py")


def _case_names():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    return [case.name for case in benchmark.CASES]


def test_quick_mode_writes_a_full_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    backend = keras.backend.backend()
    with open(tmp_path / f"benchmark_{backend}_quick.json") as f:
        report = json.load(f)
    assert (tmp_path / f"benchmark_{backend}_quick.png").stat().st_size > 0

    results = report["results"]
    modes = {"tensorflow": 2, "jax": 1, "torch": 1}[backend]
    ran = {r["case"] for r in results}
    assert len(results) == len(ran) * modes, results
    # Every case either ran or was reported as skipped (a layer that
    # keras_rotconv does not have yet).
    skipped = {
        line.split("'")[1]
        for line in run.stdout.splitlines()
        if line.startswith("skipped '")
    }
    assert ran | skipped == set(_case_names()), run.stdout
    assert not ran & skipped
    for r in results:
        for key in ("time_ratio", "cpu_ratio", "rotconv_ms", "builtin_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert len(r["block_ratios"]) >= 7, r
        if backend == "tensorflow":
            assert r["rotconv_bytes"] > 0 and r["builtin_bytes"] > 0, r
            assert r["memory_ratio"] == r["rotconv_bytes"] / r["builtin_bytes"]
    assert report["machine"]["backend"] == backend
    assert report["settings"]["quick"] is True
