#!/usr/bin/env bash
# Builds libsamopt and runs the C quickstart (examples/c/quickstart.c): logistic regression trained
# with SAM through the C API.
#
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev; }
bash scripts/build-lib.sh
mkdir -p target/examples
cc -std=c11 -O2 -Wall -Wextra -Iinclude examples/c/quickstart.c -Ltarget/release -lsamopt -lm \
   -Wl,-rpath,"$PWD/target/release" -o target/examples/quickstart
exec target/examples/quickstart
