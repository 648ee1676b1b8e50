#!/usr/bin/env bash
# Installs samopt into a temporary prefix with `make install`, then builds the C and C++
# quickstarts against the installed files as a user would: with CMake's find_package(samopt)
# (shared and static) and with pkg-config; runs each.
#
#   bash scripts/package-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"
make --quiet install PREFIX="$prefix" >/dev/null
echo "package: installed into a temporary prefix: $(cd "$prefix" && find . -type f | sort | tr '\n' ' ')"

cmake -S examples/cmake -B "$work/build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_RPATH="$prefix/lib" >/dev/null
cmake --build "$work/build" >/dev/null
for exe in quickstart_c quickstart_cpp quickstart_static; do
    "$work/build/$exe" | tail -n 1 | sed "s/^/package: cmake $exe: /"
done

export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cc -std=c11 -Wall -Wextra -Werror examples/c/quickstart.c $(pkg-config --cflags --libs samopt) -lm \
   -Wl,-rpath,"$prefix/lib" -o "$work/pc_c"
c++ -std=c++17 -Wall -Wextra -Werror examples/cpp/quickstart.cpp $(pkg-config --cflags --libs samopt) \
   -Wl,-rpath,"$prefix/lib" -o "$work/pc_cpp"
"$work/pc_c" | tail -n 1 | sed 's/^/package: pkg-config quickstart.c: /'
"$work/pc_cpp" | tail -n 1 | sed 's/^/package: pkg-config quickstart.cpp: /'
echo "package: samopt $(pkg-config --modversion samopt) found by CMake and pkg-config"
