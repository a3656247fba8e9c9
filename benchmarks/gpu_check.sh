#!/usr/bin/env bash
# One GPU session's checks, run from the repository root on a machine with
# an NVIDIA GPU, JAX and torch (no TensorFlow needed):
#
#     bash benchmarks/gpu_check.sh OUT [BENCH_SECONDS] [TEST_SECONDS]
#
# 1. benchmarks/benchmark.py under torch (eager) and JAX (jit), every case,
#    with the package's forms and with --textbook (the rules alone), results
#    and logs into OUT (torch also measures CUDA memory);
# 2. `keras-rotconv verify` under both;
# 3. the gradient suites under both (conftest.py turns TF32 off),
#    each cut at TEST_SECONDS (pytest-xdist spreads them over the CPUs).
#
# Wheels in .whl/ (Keras and what it needs beyond the machine's image) are
# installed first when present. Every step runs under a time limit, so the
# whole script ends within about 4 x BENCH_SECONDS + 2 x (60 + TEST_SECONDS).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT [BENCH_SECONDS] [TEST_SECONDS]}
bench_seconds=${2:-150}
test_seconds=${3:-90}
mkdir -p "$out"
log="$out/gpu_check.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
{
    date -u
    nvidia-smi -L
    KERAS_BACKEND=jax python3 -c "import jax, keras, torch; print('torch', torch.__version__,
'jax', jax.__version__, 'keras', keras.__version__, jax.devices())"
} 2>&1 | tee "$log"

step() {  # step SECONDS NAME COMMAND...: run with a limit, log, time it
    local seconds=$1 name=$2 start=$SECONDS
    shift 2
    echo "=== $name" | tee -a "$log"
    timeout -s INT -k 20 "$seconds" "$@" 2>&1 | grep -v -e "UserWarning" -e "warnings.warn" \
        | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} in $((SECONDS - start)) s" \
        | tee -a "$log"
}

for backend in torch jax; do
    for rules in "" --textbook; do
        KERAS_BACKEND=$backend step "$bench_seconds" \
            "benchmark $backend $rules" python3 benchmarks/benchmark.py \
            --blocks 9 --block-seconds 0.1 --out "$out" $rules
    done
done
# (at most 8 files come back from a GPU session: the charts are drawn again
# from the JSON files.)
rm -f "$out"/*.png
for backend in torch jax; do
    KERAS_BACKEND=$backend step 60 "verify $backend" \
        python3 -m keras_rotconv verify
done
for backend in torch jax; do
    KERAS_BACKEND=$backend step "$test_seconds" \
        "tests $backend" python3 -m pytest -q -rfE -p no:cacheprovider -n 8 \
        tests/test_rules.py tests/test_tuning.py tests/test_family.py \
        tests/test_ops.py tests/test_parity.py
done
