#!/usr/bin/env bash
# Builds examples/mpi/train.c with mpicc and runs it on 2 ranks in both modes (per-worker and
# global-norm SAM). Each run checks bit-identical weights on every rank and agreement with a
# single-process run over the whole training set.
#
#   bash scripts/mpi-example.sh [RANKS]        (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
command -v mpicc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev; }
cargo build --release --locked --lib
mkdir -p target/mpi
mpicc -std=c11 -Wall -Wextra -Werror -O2 -Iinclude examples/mpi/train.c -Ltarget/release -lsamopt -lm \
      -Wl,-rpath,"$PWD/target/release" -o target/mpi/train_mpi
# As root (CI), Open MPI wants --allow-run-as-root; --oversubscribe lets 2 ranks share fewer cores.
flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
for mode in msharp global; do
    mpirun "${flags[@]}" -np "$ranks" target/mpi/train_mpi --mode "$mode"
done
