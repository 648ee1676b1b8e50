#!/usr/bin/env bash
# Builds examples/cpp/libtorch against an installed samopt (make install into a build prefix:
# libsamopt.so.<ABI>, samopt_torch.hpp, CMake's find_package(samopt)) and LibTorch from PyPI's
# wheel (scripts/install-libtorch.sh), with CMake; runs the example, or with --bench the benchmark.
#
#   bash scripts/libtorch-example.sh [--ascent-fraction F] [--steps N]
#   bash scripts/libtorch-example.sh --bench [--threads N] [--reps R] [--layouts resnet50,gpt2_small]
set -euo pipefail
cd "$(dirname "$0")/.."
torch=$(bash scripts/install-libtorch.sh | tail -n 1)
prefix="$PWD/target/libtorch-example/prefix"
make --quiet install PREFIX="$prefix" >/dev/null
cmake -S examples/cpp/libtorch -B target/libtorch-example/build -DCMAKE_BUILD_TYPE=Release \
      -DTORCH_DIR="$torch" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_RPATH="$prefix/lib;$torch/lib" >/dev/null
cmake --build target/libtorch-example/build >/dev/null
if [ "${1:-}" = --bench ]; then
    shift
    exec target/libtorch-example/build/libtorch_bench "$@"
fi
exec target/libtorch-example/build/libtorch_train "$@"
