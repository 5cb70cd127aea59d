#!/usr/bin/env bash
# Runs both fuzzers for a bounded time each and prints how many inputs each executed.
#   tests/fuzz/run_fuzzers.sh [seconds per fuzzer, default 60]
# - fuzz_table: libFuzzer on the C validators (clang -fsanitize=fuzzer,address,undefined)
# - fuzz_load:  atheris on safeckpt.load_bytes / Reader, C core and Python backend compared
# Each runs on a temporary copy of its corpus (tests/fuzz/corpus_*), so the checkout stays clean.
# A finding (crash, sanitizer report, property failure, uncaught exception) fails the script and
# leaves the input under $FUZZ_OUT (default: a temporary directory), to be copied into the corpus
# once fixed. Needs clang with libFuzzer and `pip install atheris`, with safeckpt installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
python="${PYTHON:-python}"
out="${FUZZ_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/safeckpt-fuzz.XXXXXX")}"
mkdir -p "$out"

run() {  # name, command...: run one fuzzer, print its executions, fail on a finding
    local name="$1" log="$out/$1.log"
    shift
    echo "== $name: ${seconds}s"
    if ! "$@" >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAIL: $name found a problem; inputs and log under $out" >&2
        return 1
    fi
    # libFuzzer and atheris end with "Done N runs in S second(s)"
    local done_line
    done_line="$(grep -E "^Done [0-9]+ runs" "$log" || true)"
    echo "$name: ${done_line:-finished (no run count in its log)}"
}

flags=(-max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=0)

clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Icsrc \
    tests/fuzz/fuzz_table.c csrc/*.c -lpthread -o "$out/fuzz_table"
cp -r tests/fuzz/corpus_c "$out/corpus_c"
run fuzz_table "$out/fuzz_table" "$out/corpus_c" -artifact_prefix="$out/" "${flags[@]}"

cp -r tests/fuzz/corpus_py "$out/corpus_py"
run fuzz_load "$python" tests/fuzz/fuzz_load.py "$out/corpus_py" -artifact_prefix="$out/" "${flags[@]}"
