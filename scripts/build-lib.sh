#!/usr/bin/env bash
# Builds the release libsamopt (cargo build --release --locked --lib) and links
# target/release/libsamopt.so.<ABI> -> libsamopt.so beside it: the library's SONAME is
# libsamopt.so.<ABI>, the name a program linked against it asks the loader for, so programs built
# in this tree with -Ltarget/release -lsamopt and an rpath there find it. (`make install` installs
# the versioned file and both links instead.)
#
#   bash scripts/build-lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --lib
abi=$(sed -n 's/^#define SAM_ABI_VERSION \([0-9][0-9]*\)$/\1/p' include/samopt.h)
[ -n "$abi" ] || { echo "build-lib: no SAM_ABI_VERSION in include/samopt.h" >&2; exit 1; }
ln -sfn libsamopt.so "target/release/libsamopt.so.$abi"
