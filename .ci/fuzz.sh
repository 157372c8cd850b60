#!/usr/bin/env bash
# Bounded fuzzing runs (issue 24): the GGUF reader, the X²L index loader (and what reads an index
# afterwards) and the video path, each from its seed corpus in tests/fuzz_corpus, under atheris
# (libFuzzer). Any crash or unexpected exception fails the run; its input is kept in $FUZZ_OUT.
#   FUZZ_SCALE=4 .ci/fuzz.sh      # four times the runs
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${FUZZ_SCALE:-1}
out=${FUZZ_OUT:-$(mktemp -d /tmp/x2l_fuzz.XXXXXX)}
run() {  # name runs max_len
    local name=$1 runs=$(( $2 * scale )) max_len=$3 corpus="$out/$1-corpus"
    mkdir -p "$corpus" "$out/$name-artifacts"
    cp tests/fuzz_corpus/"$name"/* "$corpus"/
    echo "== fuzz $name: $runs runs"
    # -max_total_time bounds a slow machine; the run count is what is reported.
    (cd "$out" && python "$OLDPWD/tests/fuzz_$name.py" -runs="$runs" -max_len="$max_len" -max_total_time=$(( 300 * scale )) \
        -seed=24 -artifact_prefix="$out/$name-artifacts/" "$corpus" 2> "$out/$name.log") || {
        tail -50 "$out/$name.log"; echo "fuzz $name FAILED (inputs in $out/$name-artifacts)"; exit 1; }
    grep -E "^Done [0-9]+ runs|DONE" "$out/$name.log" | tail -2
}
run gguf 20000 4096
run index 2000 16384
run video 1000 16384
echo "== fuzz: clean"
