#!/usr/bin/env bash
# samopt-burn (bindings/burn): SAM for Burn models on Burn's wgpu backend, in place in Burn's own
# buffers. Its tests with Burn's kernel fusion on (Burn's default) and off, a check that one wgpu
# is linked, and the example (SGD vs SAM on the demo's noisy-label task, its first SAM steps
# checked against samopt's CPU engine). Burn is a large build (about 30 min the first time on 2
# cores; the fusion-off build shares everything below Burn's own crates).
#
#   bash scripts/burn-test.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/../bindings/burn"
epochs="${1:-30}"

# One wgpu in the graph: Burn's (through cubecl-wgpu) must be samopt's, or a Burn buffer is not a
# buffer samopt can bind. `cargo tree -d` lists every crate present in two versions.
dups=$(cargo tree --locked -d -e normal)
if grep -E '^wgpu(-core|-hal|-types)? v' <<<"$dups"; then
    echo "scripts/burn-test.sh: two versions of wgpu are linked (above)" >&2
    exit 1
fi
cargo fmt --check
cargo test --release --locked -- --test-threads=1
cargo test --release --locked --no-default-features -- --test-threads=1
cargo run --release --locked --quiet --example train -- --epochs "$epochs"
