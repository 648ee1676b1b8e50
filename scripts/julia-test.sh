#!/usr/bin/env bash
# Tests the Julia package bindings/julia (SamOpt) as a user gets it: Pkg.develop into a fresh
# environment, then Pkg.test("SamOpt"), then the Julia example in that environment, against the
# release library, with the Julia that scripts/install-julia.sh installs (Debian 12 has none).
# SamOpt depends on standard libraries only, so it needs no package registry; Julia 1.5's Pkg still
# clones the General registry when its depot has none, which this machine cannot reach, so the
# test runs in a private depot whose only registry is an empty local one.
#
#   bash scripts/julia-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
julia=$(bash scripts/install-julia.sh | tail -n 1)
bash scripts/build-lib.sh
export SAMOPT_LIB="$PWD/target/release/libsamopt.so"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
env="$work/env"
export JULIA_DEPOT_PATH="$work/depot"
mkdir -p "$env" "$JULIA_DEPOT_PATH/registries/Empty"
printf 'name = "Empty"\nuuid = "d4d4a7a6-a3a3-4f0c-9a8e-3b8e0c6a7f10"\nrepo = ""\n\n[packages]\n' \
    > "$JULIA_DEPOT_PATH/registries/Empty/Registry.toml"
"$julia" --startup-file=no --project="$env" -e 'using Pkg; Pkg.develop(path = "bindings/julia"); Pkg.test("SamOpt")'
"$julia" --startup-file=no --project="$env" examples/julia/train.jl | tail -n 1
