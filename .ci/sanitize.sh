#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer job (issue 24): builds the C++ core and bindings with
# X2L_SANITIZE=ON into a throw-away folder, then runs the tests that feed it files and arguments (GGUF,
# tokenizer, LLM, X²L index save/load/mutations) with the ASan runtime preloaded into Python (an
# instrumented extension module cannot load ASan itself), and a LeakSanitizer pass over loading and
# refusing indexes and models. Any report fails the job (leaks: those whose allocation passes through
# x2l-edge).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${SANITIZE_DIR:-$(mktemp -d /tmp/x2l_sanitize.XXXXXX)}
echo "== sanitize: building into $dest"
pip install --no-deps --no-build-isolation --upgrade --target "$dest" -C cmake.define.X2L_SANITIZE=ON \
    -C cmake.define.X2L_CUDA=OFF -C cmake.define.X2L_TESTING=ON -C build-dir=build/sanitize . > "$dest/build.log" 2>&1 || { tail -40 "$dest/build.log"; exit 1; }
core=$(ls "$dest"/x2l_edge/_core*.so)
# The ASan runtime the module was linked against (gcc's libasan here; clang's when built with clang),
# and the C++ runtime: ASan finds __cxa_throw only in libraries loaded before it initialises, and
# Python itself does not load libstdc++ (without it every C++ exception aborts in ASan's interceptor).
asan=$(ldd "$core" | awk '/libasan/ {print $3}')
cxx=$(ldd "$core" | awk '/libstdc\+\+|libc\+\+\.so/ {print $3}')
[ -n "$asan" ] || { echo "sanitize: $core is not linked against libasan"; exit 1; }
preload="$asan $cxx"
echo "== sanitize: LD_PRELOAD=$preload"
export PYTHONPATH="$dest"
# Python keeps its own allocations to the end: leaks are checked by the focused pass below instead.
# The extension's static initialisers run after Python's, hence no ODR / init-order checks across them.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0:check_initialization_order=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# The file-facing tests, and the LLM and X²L paths on tiny models; the SmolLM2 accuracy runs (minutes
# each under ASan on 2 cores) stay in the main suite.
tests=(tests/test_untrusted.py tests/test_gguf.py tests/test_tokenizer.py tests/test_x2l.py tests/test_llm.py)
skip="atheris or planted_chunk or smollm2_logits or smollm2_chat or kv_cache_types or long_context or throughput"
log="$dest/pytest.log"
if ! LD_PRELOAD="$preload" pytest -q -p no:cacheprovider -x -k "not ($skip)" --durations=8 "${tests[@]}" > "$log" 2>&1; then
    grep -B2 -A40 -m1 "ERROR: AddressSanitizer\|runtime error\|ERROR: LeakSanitizer\|CHECK failed" "$log" || tail -60 "$log"
    echo "sanitize: tests failed under ASan/UBSan (log: $log)"
    exit 1
fi
grep -A12 "slowest" "$log" || true
tail -1 "$log"
echo "== sanitize: leaks"
# Python and numpy keep some allocations for the life of the process; a leak counts when an allocation
# stack passes through the x2l-edge module (its C++ code or bindings).
ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=0:malloc_context_size=40:log_path=$dest/lsan" \
    LD_PRELOAD="$preload" python tests/leak_check.py
ours=$(cat "$dest"/lsan.* 2>/dev/null | awk '/^(Direct|Indirect) leak/ {block=$0; keep=0; next}
    /x2l_edge\/_core|x2l::/ && block != "" {if (!keep) print block; keep=1}' | wc -l)
total=$(cat "$dest"/lsan.* 2>/dev/null | grep -c "^\(Direct\|Indirect\) leak" || true)
echo "leak reports: $total in all, $ours through x2l-edge"
[ "$ours" -eq 0 ] || { cat "$dest"/lsan.*; echo "sanitize: leaks in x2l-edge"; exit 1; }
echo "== sanitize: clean"
