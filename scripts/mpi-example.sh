#!/usr/bin/env bash
# Builds examples/mpi/train.c with mpicc and runs it on RANKS ranks in its three modes:
#   replicated  gradients all-reduced before the first step: exact SAM over the global batch
#   msharp      per-worker perturbation (m-sharpness): only the second gradient all-reduced
#   sharded     parameters split across ranks; sam_set_allreduce gives the norm over all shards
# Each run checks its weights against the single-process equivalent (and, where every rank holds
# all the parameters, bit-identical weights on every rank) and fails when a check fails.
#
#   bash scripts/mpi-example.sh [RANKS]        (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
command -v mpicc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev; }
bash scripts/build-lib.sh
mkdir -p target/mpi
mpicc -std=c11 -Wall -Wextra -Werror -O2 -Iinclude examples/mpi/train.c -Ltarget/release -lsamopt -lm \
      -Wl,-rpath,"$PWD/target/release" -o target/mpi/train_mpi
# As root (CI), Open MPI wants --allow-run-as-root; --oversubscribe lets 2 ranks share fewer cores.
flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
for mode in replicated msharp sharded sharded-looksam; do
    mpirun "${flags[@]}" -np "$ranks" target/mpi/train_mpi --mode "$mode"
done
