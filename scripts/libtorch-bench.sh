#!/usr/bin/env bash
# The optimizer's share of a SAM step with LibTorch: samopt::SAM (samopt_torch.hpp) beside
# plain-LibTorch reference SAM in ATen's _foreach ops, on the ResNet-50 and GPT-2 small layouts of
# benches/param_layouts.json, with and without SGD momentum; prints a table of medians and ratios.
#
#   bash scripts/libtorch-bench.sh [--threads N] [--reps R] [--layouts resnet50,gpt2_small]
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/libtorch-example.sh --bench "$@"
