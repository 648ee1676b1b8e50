#!/usr/bin/env bash
# Runs the C test program and the C quickstart under valgrind's memcheck, against the release
# cdylib: fails on any memory error and on any block definitely or indirectly lost.
# The GPU is hidden from wgpu here (Mesa's JIT under valgrind is slow and not ours to check);
# the Rust tests cover the GPU paths.
#
#   bash scripts/memcheck.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-lib.sh
out=target/memcheck
mkdir -p "$out"
for src in tests/c/capi_test.c examples/c/quickstart.c; do
    bin="$out/$(basename "$src" .c)"
    cc -std=c11 -Wall -Wextra -Werror -pedantic -O1 -g -Iinclude "$src" -Ltarget/release -lsamopt -lm \
       -Wl,-rpath,"$PWD/target/release" -o "$bin"
    # The GPU is hidden on purpose, so the program must not require one (CI sets SAMOPT_REQUIRE_GPU).
    env -u SAMOPT_REQUIRE_GPU WGPU_BACKEND=vulkan VK_ICD_FILENAMES=/nonexistent.json VK_DRIVER_FILES=/nonexistent.json \
    valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
             --show-leak-kinds=definite,indirect "$bin" > "$bin.log" 2>&1 || {
        echo "memcheck: $src failed under valgrind:"; cat "$bin.log"; exit 1;
    }
    echo "memcheck: $(basename "$src"): 0 errors, 0 bytes definitely or indirectly lost ($(tail -n1 "$bin.log"))"
done
