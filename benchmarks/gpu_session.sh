#!/usr/bin/env bash
# One call on a GPU machine: environment, the whole test suite on CUDA, the fastattn-bench full
# sweep and the pytest-benchmark suites, every output into OUT_DIR. Each step has a time limit
# and the next step runs whatever the previous one did; the exit status is non-zero when any
# step failed. Every call first builds the C++/CUDA extension in place (ninja: a rebuild on a
# still-warm machine only relinks), so the native backend's CUDA kernels are tested and timed.
# Fits the device tool's 10-minute call: at most 30+240+180+200 s plus 15 s of grace per step
# that overruns, and the build's 240 s are only reached on a cold machine (its longest nvcc
# job, csrc/attention/attention_cuda_d128.cu, took 45 s for sm_90a on the 2-core CPU machine,
# the attention files 230 s in all, which ninja spreads over MAX_JOBS); after a cold build the
# rest of a call is 30+~10+180+200 s.
#
#   bash benchmarks/gpu_session.sh OUT_DIR                                  # tests, sweep
#   STEPS="pytest-bench train" bash benchmarks/gpu_session.sh OUT_DIR2     # a second call
#
# STEPS (default "tests bench"; the environment and build steps always run) picks steps:
# "train" trains the reference GPT (GPT-2-small shape) at 1k and 4k context with fastattn's
# default backend and with plain PyTorch, TRAIN_STEPS steps each, into train.json (tokens/s,
# peak memory and the loss curve of every run), within TRAIN_S seconds.
#
# Needs no network: run from the repository root of a copied working tree; fastattn is used
# from here through PYTHONPATH (or install it with pip install --no-deps --no-build-isolation -e .).
# "pytest-bench" runs one representative case per op under pytest-benchmark.
# "tune" runs `fastattn-bench tune` on the GPU (every backend per op and shape class, checked,
# then timed forward+backward) into tune.json, within TUNE_S seconds; a call of its own:
#   STEPS="tune" bash benchmarks/gpu_session.sh OUT_DIR3
# "sanitize" runs benchmarks/sanitize_cuda.py (every native CUDA kernel once, small sizes, with
# a loose check against the float64 reference) plainly, then under compute-sanitizer's memcheck
# and racecheck tools into memcheck.log and racecheck.log, within SANITIZE_S seconds each
# (60 + 2 x 140 s at most: with a cold build, 30+240+60+280 s in all); a call of its own, best
# before the first "tests" of a new kernel:
#   STEPS="sanitize" bash benchmarks/gpu_session.sh OUT_DIR4
# "smoke" is sanitize's plain run alone (60 s: which kernel, if any, faults or is wrong), for a
# lease that has room for one call only (15 minutes of device time, the machine's start
# included; the build's 180 s there are four times its longest nvcc job here, the rest goes to
# the sweep):
#   STEPS="smoke tests bench" BUILD_S=180 TESTS_S=140 BENCH_S=185 bash benchmarks/gpu_session.sh OUT_DIR
# After the plain run (and the sanitizer's, if asked), the steps that follow run the newest
# attention kernel set that passed it: with FASTATTN_CUDA_PINGPONG=0 if the default kernels
# failed or hung there but passed without the TMA forward's turns on the tensor cores,
# FASTATTN_CUDA_TMA=0 if the TMA kernels failed either way, FASTATTN_CUDA_WGMMA=0 if Hopper's
# cp.async ones did too, since a kernel that fails, faults or hangs once does so in every step,
# and one hang would use up the tests' and the sweep's time; session.log says which
# ("=== smoke: ...").
# OUT_DIR gets at most 7 files (the device tool brings back at most 8): session.log, junit.xml,
# bench.json, bench.csv, plots.tar.gz (one PNG per op), pytest-benchmark.json, train.json,
# tune.json, memcheck.log, racecheck.log (never all in one call).
# Limits (seconds) can be changed: BUILD_S, TESTS_S, BENCH_S, PYTEST_BENCH_S, TRAIN_S, TUNE_S,
# SANITIZE_S;
# FASTATTN_CUDA_ARCHS (default 90a here: the lent GPUs are Hopper) and MAX_JOBS reach setup.py;
# BENCH_SIZE=--quick
# makes a dry run on a CPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COLUMNS=${COLUMNS:-200}
BUILD_S=${BUILD_S:-240}
TESTS_S=${TESTS_S:-180}
BENCH_S=${BENCH_S:-200}
PYTEST_BENCH_S=${PYTEST_BENCH_S:-70}
TRAIN_S=${TRAIN_S:-420}
TRAIN_STEPS=${TRAIN_STEPS:-100}
TUNE_S=${TUNE_S:-420}
SANITIZE_S=${SANITIZE_S:-140}
STEPS=${STEPS:-tests bench}
export FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BENCH_SIZE=${BENCH_SIZE:---full}  # --quick for a dry run of this script on a CPU machine

# pytest with SIGTERM turned into KeyboardInterrupt, so a step cut by its time limit still
# writes its junit/benchmark files and summary (fastattn-bench does the same by itself).
# (SIGINT is no use here: shells started in the background ignore it.)
PYTEST=(python -c 'import signal, sys, pytest
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))')

wants() { [[ " $STEPS " == *" $1 "* ]]; }

# The attention kernel set the steps after the smoke run use, from the verdicts sanitize_cuda.py
# wrote to $1 (one line per set, in the order sm80, no-tma, no-pingpong, default, as each set
# finishes: a set that hung or faulted, and every set after it, has none).
use_kernels_that_passed() {
    local summary=$1
    if grep -qx 'kernels default: all ok' "$summary"; then
        return
    elif grep -qx 'kernels no-pingpong: all ok' "$summary"; then
        export FASTATTN_CUDA_PINGPONG=0
        echo "=== smoke: the default attention kernels failed or hung; the steps below run with" \
            "FASTATTN_CUDA_PINGPONG=0 (the TMA forward without its warpgroups' turns)"
    elif grep -qx 'kernels no-tma: all ok' "$summary"; then
        export FASTATTN_CUDA_TMA=0
        echo "=== smoke: the default attention kernels failed or hung; the steps below run with" \
            "FASTATTN_CUDA_TMA=0 (Hopper's cp.async kernels)"
    elif grep -qx 'kernels sm80: all ok' "$summary"; then
        export FASTATTN_CUDA_WGMMA=0
        echo "=== smoke: the Hopper attention kernels failed or hung; the steps below run with" \
            "FASTATTN_CUDA_WGMMA=0 (the sm_80 kernels)"
    else
        echo "=== smoke: no attention kernel set passed; the steps below run the default ones"
    fi
}

train_runs() {  # GPT-2-small shape, 16k tokens per step, fastattn and plain PyTorch per context
    local dir=$OUT/train-runs ctx batch impl
    mkdir -p "$dir"
    for ctx in 1024 4096; do
        batch=$(( 16384 / ctx ))
        for impl in fastattn pytorch; do
            echo "--- train: context $ctx, batch $batch, impl $impl"
            python -m fastattn.models.train --impl "$impl" --block-size "$ctx" \
                --batch-size "$batch" --n-layer 12 --n-head 12 --n-embd 768 --lr 6e-4 \
                --min-lr 6e-5 --warmup 10 --steps "$TRAIN_STEPS" --eval-every 50 \
                --eval-batches 4 --sample 0 --quiet --log-json "$dir/$impl-$ctx.json" || return
        done
    done
}

merge_train() {  # the runs' logs as one file: {"<impl>-<ctx>": log, ...}
    python - "$OUT/train-runs" "$OUT/train.json" <<'PY'
import json, pathlib, sys
runs = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs))
for name, log in runs.items():
    last = log["records"][-1]
    print(name, {k: last.get(k) for k in ("step", "loss", "val_ppl", "tokens_per_s", "peak_mem_gb")})
PY
    rm -r "$OUT/train-runs"
}

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
PY
    git log -1 --format="commit %H %s" 2>/dev/null || true'

step build "$BUILD_S" bash -c 'python setup.py -q build_ext --inplace && python -c "
import fastattn
for op in (\"softmax\", \"cross_entropy\", \"attention\"):
    print(op, fastattn.backend_status(\"cuda\", op))"'


# Sanitize first: a kernel that faults leaves the CUDA context unusable for the rest of a
# process, so each run here is its own process, and the plain run's per-case lines come first.
if wants smoke || wants sanitize; then
    smoke_summary=$(mktemp)
    step cuda-smoke 60 python benchmarks/sanitize_cuda.py --summary "$smoke_summary"
fi
if wants sanitize; then
    # compute-sanitizer ships with the CUDA toolkit; PATH may not have it
    SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
        2>/dev/null | head -n 1)
    for tool in memcheck racecheck; do
        step "$tool" "$SANITIZE_S" "${SANITIZER:-compute-sanitizer}" --tool "$tool" \
            --error-exitcode 1 --log-file "$OUT/$tool.log" python benchmarks/sanitize_cuda.py
    done
fi
# after the sanitizer, which is there to look into the kernels that failed
if wants smoke || wants sanitize; then
    use_kernels_that_passed "$smoke_summary"
fi

wants tests && step tests "$TESTS_S" "${PYTEST[@]}" -q -p no:cacheprovider \
    --junitxml="$OUT/junit.xml"

# The sweep stops starting new cases 40 s before its limit, leaving time to write the files;
# a SIGTERM from the limit also writes what was measured.
if wants bench; then
    step fastattn-bench "$BENCH_S" python -m fastattn.bench "$BENCH_SIZE" --no-progress \
        --budget-s $(( BENCH_S - 40 )) \
        --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/plots"
    # one file for the plots: the device tool brings back at most 8 files
    [ -d "$OUT/plots" ] && tar -czf "$OUT/plots.tar.gz" -C "$OUT" plots && rm -r "$OUT/plots"
fi

# One representative case per op (Llama-3-8B heads at 4k tokens; 16k-column softmax rows;
# Llama-3 vocabulary), fastattn's Triton kernels against PyTorch and SDPA's flash backend.
wants pytest-bench && step pytest-benchmark "$PYTEST_BENCH_S" "${PYTEST[@]}" benchmarks -q \
    -p no:cacheprovider --benchmark-json="$OUT/pytest-benchmark.json" \
    -k "(4096x16384 or 8192x128256 or llama3-8b_B4_L4096) and (fastattn-triton or -torch] or sdpa-flash)"

wants tune && step tune "$TUNE_S" python -m fastattn.bench tune --device cuda \
    --out "$OUT/tune.json"

if wants train; then
    export -f train_runs
    export OUT TRAIN_STEPS
    step train "$TRAIN_S" bash -c train_runs
    merge_train
fi
} 2>&1 | tee "$OUT/session.log"

# the steps ran in the pipeline's subshell: read their exit codes back from the log
mapfile -t failed < <(grep -E '^=== .*: exit [1-9]' "$OUT/session.log")
if [ "${#failed[@]}" -ne 0 ]; then
    printf 'FAILED STEP %s\n' "${failed[@]}" | tee -a "$OUT/session.log"
    exit 1
fi
echo "all steps passed" | tee -a "$OUT/session.log"
