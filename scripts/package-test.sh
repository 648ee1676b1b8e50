#!/usr/bin/env bash
# Installs samopt into a temporary prefix with `make install` and checks the installed shared
# library as a distribution would (the versioned file, its SONAME, the links), then builds the C and
# C++ quickstarts against the installed files as a user would: with CMake's find_package(samopt)
# (shared and static) and with pkg-config; runs each. Last, `cargo package`: the crate holds what
# builds it and nothing else, and builds from the packaged sources alone.
#
#   bash scripts/package-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"
make --quiet install PREFIX="$prefix" >/dev/null
echo "package: installed into a temporary prefix: $(cd "$prefix" && find . -type f -o -type l | sort | tr '\n' ' ')"

# libsamopt.so -> libsamopt.so.<ABI> -> libsamopt.so.<ABI>.<version>, whose SONAME is libsamopt.so.<ABI>.
abi=$(sed -n 's/^#define SAM_ABI_VERSION \([0-9][0-9]*\)$/\1/p' include/samopt.h)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
lib="$prefix/lib"
[ -f "$lib/libsamopt.so.$abi.$version" ] && [ ! -L "$lib/libsamopt.so.$abi.$version" ] || { echo "package: no file libsamopt.so.$abi.$version" >&2; exit 1; }
[ "$(readlink "$lib/libsamopt.so.$abi")" = "libsamopt.so.$abi.$version" ] || { echo "package: libsamopt.so.$abi is not a link to libsamopt.so.$abi.$version" >&2; exit 1; }
[ "$(readlink "$lib/libsamopt.so")" = "libsamopt.so.$abi" ] || { echo "package: libsamopt.so is not a link to libsamopt.so.$abi" >&2; exit 1; }
soname=$(readelf -d "$lib/libsamopt.so.$abi.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = "libsamopt.so.$abi" ] || { echo "package: SONAME is '$soname', not libsamopt.so.$abi" >&2; exit 1; }
echo "package: readelf -d: SONAME [$soname]; libsamopt.so -> libsamopt.so.$abi -> libsamopt.so.$abi.$version"

cmake -S examples/cmake -B "$work/build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_RPATH="$prefix/lib" >/dev/null
cmake --build "$work/build" >/dev/null
for exe in quickstart_c quickstart_cpp quickstart_static; do
    "$work/build/$exe" | tail -n 1 | sed "s/^/package: cmake $exe: /"
done

# A multiarch LIBDIR (Debian's layout): CMake's config still finds the library and the headers.
multi="$work/multiarch"
make --quiet install PREFIX="$multi" LIBDIR="$multi/lib/x86_64-linux-gnu" >/dev/null
cmake -S examples/cmake -B "$work/build-multi" -DCMAKE_PREFIX_PATH="$multi" \
      -DCMAKE_BUILD_RPATH="$multi/lib/x86_64-linux-gnu" >/dev/null
cmake --build "$work/build-multi" --target quickstart_c >/dev/null
"$work/build-multi/quickstart_c" | tail -n 1 | sed 's/^/package: cmake, LIBDIR=<prefix>\/lib\/x86_64-linux-gnu: quickstart_c: /'

export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cc -std=c11 -Wall -Wextra -Werror examples/c/quickstart.c $(pkg-config --cflags --libs samopt) -lm \
   -Wl,-rpath,"$prefix/lib" -o "$work/pc_c"
c++ -std=c++17 -Wall -Wextra -Werror examples/cpp/quickstart.cpp $(pkg-config --cflags --libs samopt) \
   -Wl,-rpath,"$prefix/lib" -o "$work/pc_cpp"
"$work/pc_c" | tail -n 1 | sed 's/^/package: pkg-config quickstart.c: /'
needed=$(readelf -d "$work/pc_c" | sed -n 's/.*(NEEDED).*\[\(libsamopt[^]]*\)\]/\1/p')
[ "$needed" = "libsamopt.so.$abi" ] || { echo "package: quickstart.c needs '$needed', not libsamopt.so.$abi" >&2; exit 1; }
echo "package: programs linked with -lsamopt need $needed"
"$work/pc_cpp" | tail -n 1 | sed 's/^/package: pkg-config quickstart.cpp: /'
echo "package: samopt $(pkg-config --modversion samopt) found by CMake and pkg-config"

# The published crate: its file list (no tests, scripts, bindings or examples), then `cargo package`
# builds it from the packaged sources alone (in target/package, offline from the lock file).
files=$(cargo package --list --allow-dirty --locked 2>/dev/null)
strays=$(grep -Ev '^(\.cargo_vcs_info\.json|Cargo\.(toml|toml\.orig|lock)|build\.rs|README\.md|LICENSE-(MIT|APACHE)|include/samopt\.h|src/.*)$' <<<"$files" || true)
[ -z "$strays" ] || { echo "package: files in the crate that do not build it: $strays" >&2; exit 1; }
grep -qx 'src/gpu/shaders/sam.wgsl' <<<"$files" || { echo "package: the crate lacks the WGSL shader" >&2; exit 1; }
crate="target/package/samopt-$version.crate"
rm -f "$crate"   # so that a crate left by an earlier run cannot stand in for this one
log=$(mktemp)
if ! cargo package --allow-dirty --locked --quiet > "$log" 2>&1; then
    cat "$log" >&2
    echo "package: cargo package failed" >&2
    exit 1
fi
rm -f "$log"
[ -f "$crate" ] || { echo "package: cargo package made no $crate" >&2; exit 1; }
echo "package: cargo package: $(wc -l <<<"$files") files, $(du -k "$crate" | cut -f1) KiB, built from the packaged sources"
