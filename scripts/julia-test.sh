#!/usr/bin/env bash
# Runs the Julia binding's test suite and the Julia example against the release library, with the
# Julia that scripts/install-julia.sh installs (Debian 12 has none).
#
#   bash scripts/julia-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
julia=$(bash scripts/install-julia.sh | tail -n 1)
cargo build --release --locked --lib
export SAMOPT_LIB="$PWD/target/release/libsamopt.so"
"$julia" bindings/julia/test/runtests.jl
"$julia" examples/julia/train.jl | tail -n 1
