#!/usr/bin/env bash
# Builds and runs the GPU benchmark in one go; the table comes last.
#
#   bash scripts/gpu-bench.sh                       # ResNet-50's tensors, 25.6M parameters
#   bash scripts/gpu-bench.sh --elements 100000000  # the layout repeated to >= 10^8 parameters
#   bash scripts/gpu-bench.sh --layout gpt2         # GPT-2 small's 148 tensors, 124M parameters
#
# Pick the adapter with SAMOPT_ADAPTER=<index or name> and the API with WGPU_BACKEND=vulkan|gl.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/samopt-xdg-$(id -u)"
    mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
fi
cargo bench --locked --bench gpu --no-run
exec cargo bench --locked --bench gpu -- "$@"
