//! Names the shared library for the dynamic loader: on ELF systems its SONAME is
//! `libsamopt.so.<SAM_ABI_VERSION>` (`make install` adds the versioned file and the links), so a
//! program linked against ABI 1 asks for `libsamopt.so.1` and never loads an incompatible build.
//! The number comes from `src/capi/abi.rs`, the file the crate and the header take it from.

#[path = "src/capi/abi.rs"]
mod abi;

fn main() {
    println!("cargo:rerun-if-changed=src/capi/abi.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let abi = abi::SAM_ABI_VERSION;
    match os.as_str() {
        // Not Android: its app packages carry only unversioned lib*.so files.
        "linux" | "freebsd" | "netbsd" | "openbsd" | "dragonfly" | "illumos" | "solaris" => {
            println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libsamopt.so.{abi}");
        }
        // Elsewhere (macOS's install name, Windows' DLL name) the linker's default stays: the
        // versioned install is only built and tested on Linux.
        _ => {}
    }
}
