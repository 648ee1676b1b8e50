#!/usr/bin/env bash
# Runs every test of samopt on a fresh Debian 12 machine, installing first what the tests need
# (idempotent: nothing is installed twice). This is the command README.md gives and CI runs.
#
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: C and C++ compilers for the programs built against the headers, and
# Vulkan's loader with Mesa's lavapipe, a conformant Vulkan 1.3 driver that runs on the CPU, so the
# GPU engine's tests run for real on a machine without a GPU.
need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v c++ >/dev/null 2>&1 || need+=(g++)
if ! ldconfig -p | grep -q 'libvulkan\.so\.1'; then need+=(libvulkan1); fi
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then need+=(mesa-vulkan-drivers); fi
# Vulkan's headers for the C Vulkan example, and the Khronos validation layer its tests run under.
[ -f /usr/include/vulkan/vulkan.h ] || need+=(libvulkan-dev)
ls /usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json >/dev/null 2>&1 || need+=(vulkan-validationlayers)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v make >/dev/null 2>&1 || need+=(make)
command -v mpicc >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
# Julia's standard libraries load OpenBLAS, which needs the Fortran runtime.
if ! ldconfig -p | grep -q 'libgfortran\.so\.5'; then need+=(libgfortran5); fi
if ((${#need[@]})); then
    echo "scripts/test.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The GPU tests fail, rather than skip, when no adapter is found; the Vulkan interop test when the
# validation layer is missing.
export SAMOPT_REQUIRE_GPU=1 SAMOPT_REQUIRE_VALIDATION=1
# Mesa warns on every start unless XDG_RUNTIME_DIR names a private directory.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/samopt-xdg-$(id -u)"
    mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
fi

# Release mode: the numeric tests run 10^8-element passes and the C programs link the release cdylib.
cargo fmt --check
cargo test --release --locked
# `make install` into a temporary prefix: the versioned library, its SONAME and links; the examples
# built against it with CMake and pkg-config; `cargo package`'s file list and its build.
bash scripts/package-test.sh

# LibTorch: a training loop through samopt_torch.hpp's samopt::SAM, built against the installed
# package (make install into a prefix, find_package(samopt)), checked against plain-LibTorch
# reference SAM, with the full batch and with the ascent on a quarter of it (installs LibTorch from
# PyPI's torch wheel into a private virtualenv the first time). Then one step of the benchmark
# beside _foreach reference SAM on ResNet-50's layout: both must end at the same weights.
bash scripts/libtorch-example.sh
bash scripts/libtorch-example.sh --ascent-fraction 0.25 | grep -E "\(limit 1e-5\)$|^ok$"
bash scripts/libtorch-bench.sh --reps 1 --layouts resnet50 | tail -n 3

# A C engine's own Vulkan device and buffers under samopt, with the validation layer.
bash scripts/vulkan-example.sh

# Burn: samopt-burn's tests with Burn's fusion on and off, one wgpu linked, and its example (SGD
# vs SAM for a Burn MLP on Burn's wgpu device, in place in Burn's buffers). The longest build here.
bash scripts/burn-test.sh

# The Julia package: Pkg.develop, Pkg.test("SamOpt") and the example (installs a private Julia the
# first time).
bash scripts/julia-test.sh

# SAM over MPI on 2 ranks: replicated parameters (gradients all-reduced before the first step),
# m-sharpness (per-worker first step) and parameters sharded across ranks (sam_set_allreduce), each
# against its single-process equivalent.
bash scripts/mpi-example.sh 2

# The C programs under valgrind's memcheck: zero errors, nothing definitely or indirectly lost.
bash scripts/memcheck.sh
# The CPU engine's and the C layer's Rust tests under AddressSanitizer and LeakSanitizer (~3 min).
bash scripts/asan-test.sh

# The C ABI fuzzed for a minute (random call sequences, NULLs, bad lengths, NaN, bad checkpoints).
bash scripts/fuzz.sh "${SAMOPT_FUZZ_SECONDS:-60}"

# README's first command, as a new user runs it (about two seconds once built).
cargo run --release --locked --quiet -- demo > /dev/null
echo "scripts/test.sh: the demo ran"
