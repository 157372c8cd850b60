#!/usr/bin/env bash
# The one prepared GPU check: on a machine with an NVIDIA GPU, in one call of under 10 minutes,
#   build   the CUDA backend (+ test module) for this GPU's own architecture only,
#   tests   tests/test_cuda.py with X2L_EXPECT_GPU=1 (a missing or unusable GPU FAILS, never skips),
#   sanitize compute-sanitizer memcheck, then racecheck, over the kernel tests,
#   bench   bench/gpu/bench_cuda.py, a JSON that names the device.
# Logs, cuda_bench.json and summary.json (per stage: status, seconds) go to $OUT (or ./gpu-out); copy
# the JSON to bench/results/cuda_<device>.json. What it needs: bench/README.md ("GPU").
#
# Usage: bash bench/gpu/check.sh [stage...]          stages: build tests sanitize bench (default: all)
#   X2L_GPU_ARCH=87   the architecture when nvidia-smi cannot say (Jetson); X2L_TESTS="-k attention"
#   extra pytest args; X2L_BENCH_ARGS="--contexts 512" bench args; X2L_FULL=1 the long benchmark.
# Each stage has its own time limit (build 240 s, tests 150 s, memcheck 60 s, racecheck 45 s, bench 90 s):
# 585 s at most, so a 10-minute call always comes back with logs, even when a stage hangs. On a warm
# machine the build folder stays: "build tests" in one call and "sanitize bench" in the next also works.
# Not yet run on a GPU: no GPU has been lent to this project so far. Every stage's code has run under
# the CPU emulator of CUDA (python tests/cuda_emu/run.py: the CUDA tests and bench_cuda.py --smoke).
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-out}; mkdir -p "$OUT"
stages=${*:-build tests sanitize bench}
declare -A status seconds

if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried in for a machine without a package index
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/x2l-site .whl/*.whl \
    && export PYTHONPATH=/tmp/x2l-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-} PYTHONUNBUFFERED=1 X2L_EXPECT_GPU=1
for cand in /usr/local/cuda/bin /opt/cuda/bin; do [ -d "$cand" ] && export PATH=$PATH:$cand; done

arch=${X2L_GPU_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  echo "arch sm_${arch:-unknown}; cores $(nproc)"
} | tee "$OUT/device.txt"
if [ -z "$arch" ]; then echo "check.sh: no GPU architecture (nvidia-smi missing?): set X2L_GPU_ARCH"; exit 2; fi
export ROOT OUT arch
core() { ls "$ROOT"/build-gpu/_core*.so 2>/dev/null | head -1; }

run_stage() {  # name, limit_s, command...: runs it with a time limit, records status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  seconds[$name]=$(( $(date +%s) - t0 ))
  case $rc in 0) status[$name]=ok ;; 124|137) status[$name]="timeout after ${limit}s" ;; *) status[$name]="failed ($rc)" ;; esac
  echo "check.sh: $name ${status[$name]} in ${seconds[$name]} s"
}

build() {
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DX2L_CUDA=ON -DX2L_TESTING=ON \
      -DX2L_CUDA_ARCHITECTURES="${arch}-real" -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build.log" 2>&1 \
    && cmake --build build-gpu --target _core _testing -j "$(nproc)" >> "$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; return 1; }
}

pytest_gpu() {  # log name, extra args...
  local log=$1; shift
  X2L_CORE_PATH=$(core) python3 -m pytest -q -p no:cacheprovider --maxfail=60 --tb=short -rfE "$@" 2>&1 | tee "$OUT/$log" | tail -40
  return "${PIPESTATUS[0]}"
}

# The kernel tests (numpy references, no model files): what the sanitizers run under.
KERNELS="(get_rows or rms_norm or layer_norm or rope or rerotate or softmax or swiglu or gelu or test_attention or \
test_matmul or pool2d or set_rows or gather_rows or add_mul or layer_pipeline) and not speed"

sanitize() {
  local rc=0
  if ! command -v compute-sanitizer >/dev/null; then
    echo "check.sh: compute-sanitizer not found (CUDA toolkit's bin folder)"; status[memcheck]="no compute-sanitizer"; return 1
  fi
  # memcheck: out-of-bounds and misaligned accesses, leaks of device memory, API errors
  run_stage memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
      python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "${X2L_SAN_K:-$KERNELS}" > "$OUT/memcheck.log" 2>&1
  tail -15 "$OUT/memcheck.log"
  [ "${status[memcheck]}" = ok ] || rc=1
  # racecheck: shared-memory hazards (the attention and reduction kernels); slower, so fewer tests
  run_stage racecheck 45 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 99 --print-limit 20 \
      python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py \
      -k "${X2L_RACE_K:-(test_attention or rms_norm or softmax or rerotate) and not speed}" > "$OUT/racecheck.log" 2>&1
  tail -15 "$OUT/racecheck.log"
  [ "${status[racecheck]}" = ok ] || rc=1
  return $rc
}

bench() {
  local args=${X2L_BENCH_ARGS:-}
  [ "${X2L_FULL:-0}" = 1 ] || args="--contexts 512 2048 --tg 32 --reps 2 --x2l-tokens 4096 --vision-layers 4 --vision-frames 4 $args"
  X2L_CORE_PATH=$(core) python3 bench/gpu/bench_cuda.py --out "$OUT/cuda_bench.json" $args 2>&1 | tee "$OUT/bench.log" | tail -20
  return "${PIPESTATUS[0]}"
}

for s in $stages; do
  case $s in
    build) run_stage build 240 bash -c "$(declare -f build); build" ;;
    tests) [ -n "$(core)" ] || { echo "check.sh: build first"; status[tests]="no build"; continue; }
           run_stage tests 150 bash -c "$(declare -f pytest_gpu core); pytest_gpu tests.log tests/test_cuda.py ${X2L_TESTS:-}" ;;
    sanitize) [ -n "$(core)" ] || { status[sanitize]="no build"; continue; }
              export X2L_CORE_PATH=$(core); sanitize ;;
    bench) [ -n "$(core)" ] || { status[bench]="no build"; continue; }
           run_stage bench 90 bash -c "$(declare -f bench core); bench" ;;
    *) echo "check.sh: unknown stage $s"; exit 2 ;;
  esac
done

device=$(X2L_CORE_PATH=$(core) python3 -c "from x2l_edge import _core; print(_core.cuda_device_info(0)['name'])" 2>/dev/null \
         || nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
python3 - "$OUT/summary.json" "${device:-unknown}" <<EOF
import json, sys
stages = {$(for k in "${!status[@]}"; do printf '"%s": {"status": "%s", "seconds": %s}, ' "$k" "${status[$k]}" "${seconds[$k]:-0}"; done)}
json.dump({"device": sys.argv[2], "stages": stages}, open(sys.argv[1], "w"), indent=1)
print("check.sh summary:", json.dumps(stages))
EOF
for k in "${!status[@]}"; do [ "${status[$k]}" = ok ] || exit 1; done
exit 0
