#!/usr/bin/env bash
# Runs the Rust tests of the CPU engine and of the C layer under AddressSanitizer and
# LeakSanitizer: out-of-bounds and use-after-free in the unsafe code behind the C ABI (raw host
# buffers, versioned structs, owned tensors, the pool's workers), which a normal test run does
# not see. (Miri would need a nightly toolchain and its component; ASan needs neither, and runs
# the optimised code with its threads and SIMD kernels.)
#
#   bash scripts/asan-test.sh [cargo test options, e.g. -- --test-threads=1]
#
# The GPU is out of scope: every graphics API is hidden, so nothing opens a driver, and the tests
# that would use an adapter skip (SAMOPT_REQUIRE_GPU is unset here even when CI sets it). The
# tests build into target/asan, beside the normal build.
set -euo pipefail
cd "$(dirname "$0")/.."

# -Zsanitizer is unstable; RUSTC_BOOTSTRAP lets the stable toolchain accept it for this build.
# With an explicit --target, RUSTFLAGS reach only the target's crates: build scripts and proc
# macros run uninstrumented on the host. The standard library stays uninstrumented too (its
# allocations are still tracked: ASan replaces malloc and free).
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Zsanitizer=address -Cforce-frame-pointers=yes"
target=$(rustc -vV | sed -n 's/^host: //p')

# No GPU: wgpu's no-op backend (not compiled in) is the only API named, so AUTO's adapter search
# starts none; the Vulkan loader, should anything load it, finds no driver.
unset SAMOPT_REQUIRE_GPU
export WGPU_BACKEND=noop VK_ICD_FILENAMES=/nonexistent.json VK_DRIVER_FILES=/nonexistent.json
# A report ends the test binary with a failure; leaks are checked when each test binary exits.
# allocator_may_return_null: an allocation too large to satisfy returns NULL, as malloc does,
# instead of aborting, so that the tests of samopt's out-of-memory path (try_reserve, then
# SAM_ERR_OUT_OF_MEMORY) run here too.
export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

tests=(capi_errors cpu_step hardening checkpoint distributed threads pool)
# Without the `cli` feature: the tests use the library only, and the command's dependencies would
# only lengthen the build.
args=(--release --locked --no-default-features --target "$target" --target-dir target/asan --no-fail-fast --lib)
for t in "${tests[@]}"; do args+=(--test "$t"); done

start=$SECONDS
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test "${args[@]}" "$@" 2>&1 | tee "$log" || status=$?
elapsed=$((SECONDS - start))

passed=$(awk '/^test result: /{for (i = 1; i < NF; i++) if ($(i + 1) ~ /^passed/) n += $i} END {print n + 0}' "$log")
reports=$(grep -cE '^==[0-9]+==ERROR: (AddressSanitizer|LeakSanitizer)' "$log" || true)
if [ "$status" -ne 0 ] || [ "$reports" -ne 0 ]; then
    echo
    echo "asan-test: FAILED after ${elapsed}s (cargo exit $status, $reports sanitizer report(s)):"
    grep -E '^==[0-9]+==ERROR|^SUMMARY: (Address|Leak)Sanitizer|^test .* FAILED|^error' "$log" | head -n 40 || true
    exit $((status != 0 ? status : 1))
fi
echo
echo "asan-test: ${passed} tests passed under AddressSanitizer and LeakSanitizer (lib, ${tests[*]}) in ${elapsed}s"
