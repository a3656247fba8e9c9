"""How long a compiled model takes before its train step runs at full
speed, RotConv against the built-in layer, each model alone in a fresh
process.

``benchmark.py`` times a case's twins in one process, where whichever model
compiles first also pays the process's cold start (imports, the compiler's
first use; on torch about 25-30 s of a package-model compile on a 2-core
Xeon), so its ``first_step_s`` depends on the order. Here every model is
built and trained in a child process of its own, twice: with an empty
compile cache, as a user meets it the first time ("empty"), then in another
process with the cache the first one left, as in a user's later runs
("warm": torch's Inductor and AOTAutograd caches, JAX's persistent cache;
Dynamo traces the Python again in every process). For each:

- ``first_step_s``: the first ``train_on_batch``, which traces and compiles
  the step (``torch.compile``, ``jax.jit`` or XLA: ``jit_compile=True``,
  or ``--jit false`` for TensorFlow's ``tf.function`` alone);
- ``warm_up_s``: what the first ``--steps`` steps took beyond steady
  steps (the median of the last three), which adds the recompiles of later
  steps (torch.compile recompiles parts of Keras's train step at the
  second step);
- on torch, Dynamo's own record: graph breaks, graphs compiled, and its
  time split into tracing the Python (``bytecode_tracing``), the forward
  graphs' compile (``OutputGraph.call_user_compiler``) and the backward
  graphs' (``compile_fx.<locals>.bw_compiler``).

Each case runs ``--repeats`` times, the twins alternating; it prints the
medians and the ratio RotConv / built-in, and writes JSON (with
``benchmark.py``'s record of the machine) to ``--out``.

    KERAS_BACKEND=torch PYTHONPATH=$PWD python benchmarks/compile_time.py \\
        --cases "MNIST CNN" package
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark

KINDS = ("rotconv", "builtin")

# A child's compile cache: "empty" (a user's first run), "warm" (a later
# run, which finds the files the first one wrote).
CACHES = ("empty", "warm")

# Dynamo's timers (torch._dynamo.utils.compile_times) reported, by what
# they time.
DYNAMO_TIMERS = {
    "bytecode_tracing": "tracing the Python",
    "OutputGraph.call_user_compiler": "compiling forward graphs",
    "compile_fx.<locals>.bw_compiler": "compiling backward graphs",
    "build_guards": "building guards",
}


def child(case_name: str, kind: str, quick: bool, steps: int, jit) -> dict:
    """Build the case's ``kind`` model, train ``steps`` steps on one batch:
    the seconds of each, and on torch Dynamo's record."""
    case = next(c for c in benchmark.CASES if c.name == case_name)
    benchmark.compiles_alone([jit])
    model, shapes = benchmark.build_model(case, quick, kind, jit)
    batch = benchmark.one_batch(shapes)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(*batch)
        seconds.append(time.perf_counter() - start)
    record = {"steps_s": seconds}
    if keras.backend.backend() == "torch" and jit:
        record["dynamo"] = dynamo_record()
    return record


def dynamo_record() -> dict:
    from torch._dynamo import utils

    names, values = utils.compile_times(repr="csv", aggregate=True)
    timers = dict(zip(names, values))
    return {
        "graph_breaks": sum(utils.counters["graph_break"].values()),
        "graphs": utils.counters["stats"]["unique_graphs"],
        "seconds": {
            name: float(timers.get(name, 0.0)) for name in DYNAMO_TIMERS
        },
    }


def run_children(case_name, kind, args) -> dict:
    """``child`` in a fresh process with an empty compile cache, then in
    another fresh process with the cache the first one left: ``{"empty":
    record, "warm": record}``."""
    records = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": cache,
            "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
            "JAX_COMPILATION_CACHE_DIR": os.path.join(cache, "jax"),
        }
        for state in CACHES:
            records[state] = _child_process(case_name, kind, args, env)
    return records


def _child_process(case_name, kind, args, env) -> dict:
    run = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            json.dumps([case_name, kind]),
            "--steps",
            str(args.steps),
            "--jit",
            json.dumps(args.jit),
        ]
        + (["--quick"] if args.quick else []),
        env=env,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(
            f"{kind} model of {case_name!r} failed:\n{run.stderr[-3000:]}"
        )
    return json.loads(run.stdout.strip().splitlines()[-1])


def warm_up(steps_s: list[float]) -> float:
    """Seconds the steps took beyond steady steps (the median of the last
    three)."""
    steady = statistics.median(steps_s[-3:])
    return sum(t - steady for t in steps_s)


def summarize(records: dict[str, list[dict]]) -> dict:
    """Medians over the repeats, per twin, and RotConv's ratios."""
    result = {}
    for kind in KINDS:
        runs = records[kind]

        def median(value, runs=runs):
            return statistics.median(value(r) for r in runs)

        twin = {
            "first_step_s": median(lambda r: r["steps_s"][0]),
            "warm_up_s": median(lambda r: warm_up(r["steps_s"])),
            "runs": runs,
        }
        if "dynamo" in runs[0]:
            twin["dynamo"] = {
                "graph_breaks": median(lambda r: r["dynamo"]["graph_breaks"]),
                "graphs": median(lambda r: r["dynamo"]["graphs"]),
                "seconds": {
                    name: median(lambda r, n=name: r["dynamo"]["seconds"][n])
                    for name in DYNAMO_TIMERS
                },
            }
        result[kind] = twin
    for part in ("first_step", "warm_up"):
        rot, builtin = (result[kind][f"{part}_s"] for kind in KINDS)
        result[f"{part}_ratio"] = rot / builtin
        result[f"{part}_added_s"] = rot - builtin
    return result


def print_case(name: str, result: dict) -> None:
    rot, builtin = (result[kind] for kind in KINDS)
    print(
        f"{name:50s} first step {rot['first_step_s']:6.1f} / "
        f"{builtin['first_step_s']:6.1f} s ({result['first_step_ratio']:.2f})"
        f"  warm-up {rot['warm_up_s']:6.1f} / {builtin['warm_up_s']:6.1f} s "
        f"({result['warm_up_ratio']:.2f}, "
        f"{result['warm_up_added_s']:+.1f} s)",
        flush=True,
    )
    if "dynamo" in rot:
        for kind, twin in zip(KINDS, (rot, builtin)):
            dynamo = twin["dynamo"]
            split = ", ".join(
                f"{label} {dynamo['seconds'][name]:.1f}"
                for name, label in DYNAMO_TIMERS.items()
            )
            print(
                f"    {kind:8s} Dynamo: {dynamo['graph_breaks']:g} graph "
                f"breaks, {dynamo['graphs']:g} graphs; s: {split}"
            )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="NAME",
        help="cases, by name or part of a name (default: the two MNIST "
        "models; see benchmark.py --list-cases)",
    )
    parser.add_argument("--repeats", type=int, help="runs per twin")
    parser.add_argument("--steps", type=int, help="steps per run (at least 4)")
    parser.add_argument(
        "--jit",
        type=json.loads,
        default=True,
        help="the models' jit_compile, as JSON (default: true)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one tiny case, one run per twin: checks that the script works",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="folder for the JSON result",
    )
    parser.add_argument("--child", help="internal: [case, kind] as JSON")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.steps = args.steps or (4 if args.quick else 6)
    if args.steps < 4:
        parser.error(f"--steps must be at least 4. Received: {args.steps}")
    if args.cases is None:
        args.cases = ["1x1"] if args.quick else ["MNIST CNN", "package"]
    return parser, args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args = parse_args(argv)
    if args.child:
        case_name, kind = json.loads(args.child)
        record = child(case_name, kind, args.quick, args.steps, args.jit)
        print(json.dumps(record))
        return 0
    names = [
        c.name
        for c in benchmark.runnable(benchmark.select_cases(args.cases, parser))
    ]
    backend = keras.backend.backend()
    report = {
        "machine": benchmark.machine(argv),
        "settings": {
            "quick": args.quick,
            "repeats": args.repeats,
            "steps": args.steps,
            "jit_compile": args.jit,
        },
        "results": {},
    }
    for name in names:
        runs = {state: {kind: [] for kind in KINDS} for state in CACHES}
        for repeat in range(args.repeats):
            order = KINDS if repeat % 2 == 0 else KINDS[::-1]
            for kind in order:
                records = run_children(name, kind, args)
                for state in CACHES:
                    runs[state][kind].append(records[state])
        report["results"][name] = {
            state: summarize(runs[state]) for state in CACHES
        }
        for state in CACHES:
            print_case(f"{name}, {state} cache", report["results"][name][state])
    suffix = "_quick" if args.quick else ""
    path = benchmark.write_report(
        report, args.out, f"compile_time_{backend}{suffix}"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
