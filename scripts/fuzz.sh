#!/usr/bin/env bash
# Fuzzes the C ABI (fuzz/fuzz_targets/capi.rs) for a bounded time, under AddressSanitizer and
# LeakSanitizer, starting from the committed seed corpus (fuzz/corpus/capi, left unchanged).
#
#   bash scripts/fuzz.sh [SECONDS]      (default 60)
#
# cargo-fuzz needs the compiler's unstable flags (-Zsanitizer); RUSTC_BOOTSTRAP lets the stable
# toolchain accept them for this build only.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
corpus=$(mktemp -d)
# The log stays out of the corpus directory: libFuzzer reads every file there as an input.
log=$(mktemp)
trap 'rm -rf "$corpus" "$log"' EXIT
cd fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build capi
status=0
cargo fuzz run capi "$corpus" corpus/capi -- -max_total_time="$seconds" -print_final_stats=1 > "$log" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
    echo "fuzz: the capi target failed (exit $status):"
    tail -n 80 "$log"
    exit "$status"
fi
grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' "$log"
echo "fuzz: capi ran ${seconds}s with no failure"
