#!/usr/bin/env bash
# On a machine with a GPU: build the CUDA backend for that GPU, run every CUDA test (kernels, the LLM
# and the X²L decoder against the CPU backend), compute-sanitizer's memcheck over a subset, and
# bench/gpu/bench_cuda.py. Logs and cuda_bench.json go to $OUT (or ./gpu-out); copy the JSON to
# bench/results/cuda_<device>.json.
# Usage: bash bench/gpu/check.sh [stage...]   stages: build tests sanitize bench (default: all)
# Under a 10-minute limit per call, run "build tests" in one call and "sanitize bench" in the next
# (the build folder stays on a warm machine).
# Needs nvcc, cmake, ninja, nanobind, numpy, pytest and the `gguf` package (wheels in .whl/ are
# installed first when present). Not yet run on a GPU: no GPU has been lent to this project so far.
# Every stage's code has run under the CPU emulator of CUDA (python tests/cuda_emu/run.py: the CUDA
# tests and bench_cuda.py --smoke), so what is left to find here is what only a GPU shows.
set -u
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
stages=${*:-build tests sanitize bench}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
arch=${arch:-90}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
for s in $stages; do case $s in
build)
  t0=$(date +%s)
  cmake -S . -B build-gpu -G Ninja -DX2L_CUDA=ON -DX2L_TESTING=ON -DX2L_CUDA_ARCHITECTURES="${arch}-real" \
      -DPython_EXECUTABLE=$(command -v python3) > "$OUT/build.log" 2>&1 \
    && cmake --build build-gpu -j16 >> "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s (sm_${arch})"
  ;;
tests)
  export X2L_CORE_PATH=$(ls $PWD/build-gpu/_core*.so)
  python3 -m pytest -q --maxfail=60 --tb=line -rf -p no:cacheprovider tests/test_cuda.py ${X2L_TESTS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
  ;;
sanitize)
  export X2L_CORE_PATH=$(ls $PWD/build-gpu/_core*.so)
  timeout 240 compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
      -k "${X2L_SAN_K:-get_rows or rms_norm or rope or softmax or attention or pipeline or matmul_decode or pool2d or gelu or set_rows or rerotate or decode_graph or gather_rows or tensor_cores}" 2>&1 \
    | tee "$OUT/memcheck.log" | tail -15
  ;;
bench)
  export X2L_CORE_PATH=$(ls $PWD/build-gpu/_core*.so)
  timeout 540 python3 bench/gpu/bench_cuda.py --out "$OUT/cuda_bench.json" ${X2L_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -20
  ;;
esac; done
