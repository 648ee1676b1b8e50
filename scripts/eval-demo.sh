#!/usr/bin/env bash
# The evaluation harness behind the README's claim: runs `samopt demo` with its default settings on
# five seeds and reports, per seed, clean test accuracy and sharpness of SGD and of SAM around the
# same SGD, then how often SAM came out ahead.
#
#   bash scripts/eval-demo.sh [SEEDS] [extra demo options...]     (SEEDS defaults to 5)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-5}
shift || true
command -v python3 >/dev/null || { echo "eval-demo.sh: needs python3 to read the JSON summaries" >&2; exit 1; }
cargo build --release --locked --bin samopt >&2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for s in $(seq 1 "$seeds"); do
    target/release/samopt demo --json --seed "$s" "$@" > "$out/$s.json"
done
python3 - "$out" "$seeds" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
print(f"{'seed':>4} {'sgd acc':>8} {'sam acc':>8} {'sgd sharp':>10} {'sam sharp':>10} {'sgd rand':>9} {'sam rand':>9}")
acc_wins = sharp_wins = 0
for s in range(1, n + 1):
    runs = {r["optimizer"]: r for r in json.load(open(f"{out}/{s}.json"))["runs"]}
    a, b = runs["sgd"], runs["sam"]
    acc_wins += b["test_accuracy"] > a["test_accuracy"]
    sharp_wins += b["sharpness"] < a["sharpness"]
    print(f"{s:>4} {a['test_accuracy']:>8.3f} {b['test_accuracy']:>8.3f} {a['sharpness']:>10.4f} {b['sharpness']:>10.4f}"
          f" {a['sharpness_random']:>9.5f} {b['sharpness_random']:>9.5f}")
print(f"SAM's clean test accuracy beats SGD's in {acc_wins} of {n} seeds; its sharpness (ascent) is lower in {sharp_wins} of {n}.")
sys.exit(0 if acc_wins >= 0.8 * n and sharp_wins == n else 1)
PY
