#!/usr/bin/env bash
# Installs LibTorch (PyTorch's C++ library) from PyPI's torch wheel into a private virtualenv, for
# examples/cpp/libtorch. Idempotent. Prints the torch package directory (with include/ and lib/)
# on its last line.
#
#   bash scripts/install-libtorch.sh [VENV]      (default: $HOME/.cache/samopt-torch)
#
# The wheel ships libtorch_cpu.so, libc10.so and the headers; its CUDA runtime libraries are
# needed only to load libtorch_cuda, which the example does not link. --no-deps keeps the download
# near 550 MB.
set -euo pipefail
venv=${1:-$HOME/.cache/samopt-torch}
find_torch() { "$venv/bin/python" -c 'import os, importlib.util as u; print(os.path.dirname(u.find_spec("torch").origin))' 2>/dev/null; }
if [ -x "$venv/bin/python" ] && dir=$(find_torch) && [ -f "$dir/lib/libtorch_cpu.so" ]; then
    echo "$dir"
    exit 0
fi
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv; }
python3 -m venv "$venv" 2>/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv && python3 -m venv "$venv"; }
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps torch nvidia-cuda-runtime nvidia-cuda-cupti >&2
dir=$(find_torch)
[ -f "$dir/lib/libtorch_cpu.so" ] || { echo "install-libtorch: no libtorch_cpu.so under $dir" >&2; exit 1; }
echo "$dir"
