#!/usr/bin/env bash
# Runs every test of samopt on a fresh Debian 12 machine, installing first what the tests need
# (idempotent: nothing is installed twice). This is the command README.md gives and CI runs.
#
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: a C compiler for the C programs built against the header.
need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if ((${#need[@]})); then
    echo "scripts/test.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Release mode: the numeric tests run 10^8-element passes and the C programs link the release cdylib.
cargo fmt --check
cargo test --release --locked
