#!/usr/bin/env bash
# One call on a GPU machine: environment, the whole test suite on CUDA, the fastattn-bench full
# sweep and the pytest-benchmark suites, every output into OUT_DIR. Each step has a time limit
# and the next step runs whatever the previous one did; the exit status is non-zero when any
# step failed. Fits the device tool's 10-minute call: at most 30+180+220+70 s, plus 15 s of
# grace per step that overruns (about 9 minutes).
#
#   bash benchmarks/gpu_session.sh OUT_DIR
#
# Needs no network: run from the repository root of a copied working tree; fastattn is used
# from here through PYTHONPATH (or install it with pip install --no-deps --no-build-isolation -e .).
# OUT_DIR gets 8 files (the device tool brings back at most 8): session.log, junit.xml,
# bench.json, bench.csv, plots/<op>.png x 3, pytest-benchmark.json.
# Limits (seconds) can be changed: TESTS_S, BENCH_S, PYTEST_BENCH_S; BENCH_SIZE=--quick makes
# a dry run on a CPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COLUMNS=${COLUMNS:-200}
TESTS_S=${TESTS_S:-180}
BENCH_S=${BENCH_S:-220}
PYTEST_BENCH_S=${PYTEST_BENCH_S:-70}
BENCH_SIZE=${BENCH_SIZE:---full}  # --quick for a dry run of this script on a CPU machine

# pytest with SIGTERM turned into KeyboardInterrupt, so a step cut by its time limit still
# writes its junit/benchmark files and summary (fastattn-bench does the same by itself).
# (SIGINT is no use here: shells started in the background ignore it.)
PYTEST=(python -c 'import signal, sys, pytest
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))')

step() {  # step NAME LIMIT_S COMMAND...; prints "=== NAME: exit RC" for the summary below
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
}

{
step environment 30 bash -c '
    nvidia-smi || true
    python - <<PY
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
import fastattn; print("fastattn backends (cuda):", fastattn.backend_status("cuda"))
PY
    git log -1 --format="commit %H %s" 2>/dev/null || true'

step tests "$TESTS_S" "${PYTEST[@]}" -q -p no:cacheprovider --junitxml="$OUT/junit.xml"

# The sweep stops starting new cases 40 s before its limit, leaving time to write the files;
# a SIGTERM from the limit also writes what was measured.
step fastattn-bench "$BENCH_S" python -m fastattn.bench "$BENCH_SIZE" --no-progress \
    --budget-s $(( BENCH_S - 40 )) \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/plots"

# One representative case per op (Llama-3-8B heads at 4k tokens; 16k-column softmax rows;
# Llama-3 vocabulary), fastattn's Triton kernels against PyTorch and SDPA's flash backend.
step pytest-benchmark "$PYTEST_BENCH_S" "${PYTEST[@]}" benchmarks -q -p no:cacheprovider \
    --benchmark-json="$OUT/pytest-benchmark.json" \
    -k "(4096x16384 or 8192x128256 or llama3-8b_B4_L4096) and (fastattn-triton or -torch] or sdpa-flash)"
} 2>&1 | tee "$OUT/session.log"

# the steps ran in the pipeline's subshell: read their exit codes back from the log
mapfile -t failed < <(grep -E '^=== .*: exit [1-9]' "$OUT/session.log")
if [ "${#failed[@]}" -ne 0 ]; then
    printf 'FAILED STEP %s\n' "${failed[@]}" | tee -a "$OUT/session.log"
    exit 1
fi
echo "all steps passed" | tee -a "$OUT/session.log"
