//! C and C++ programs against the generated header and the cdylib: `tests/c/capi_test.c` (numbers
//! and error paths from C), `tests/c/abi1_test.c` (against the frozen ABI-1 header in `tests/abi`)
//! and `examples/c/quickstart.c`, compiled with
//! `-std=c11 -Wall -Wextra -Werror -pedantic`, and `tests/cpp/samopt_test.cpp` through the C++
//! wrapper with `-std=c++17 -Wall -Wextra -Werror -pedantic`; linked against `libsamopt.so`, run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the cdylib of this test's profile (cargo test builds only the rlib) and returns the
/// directory holding it.
fn cdylib_dir() -> PathBuf {
    // The test binary lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target_dir = profile_dir.parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--lib", "--target-dir"]).arg(target_dir);
    if profile_dir.file_name().unwrap() == "release" {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build --lib failed");
    assert!(profile_dir.join("libsamopt.so").exists(), "no libsamopt.so in {}", profile_dir.display());
    profile_dir
}

fn compile_and_run(source: &str, name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = cdylib_dir();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let cpp = source.ends_with(".cpp");
    let cc = if cpp {
        std::env::var("CXX").unwrap_or_else(|_| "c++".into())
    } else {
        std::env::var("CC").unwrap_or_else(|_| "cc".into())
    };
    let std = if cpp { "-std=c++17" } else { "-std=c11" };
    let status = Command::new(&cc)
        .args([std, "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"])
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("bindings/cpp"))
        .arg("-I")
        .arg(root.join("tests/abi"))
        .arg(root.join(source))
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&lib)
        .args(["-lsamopt", "-lm"])
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "{cc} failed on {source}");
    let run = Command::new(&out).output().expect("run the C program");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{name} failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn c_api_test_program() {
    let out = compile_and_run("tests/c/capi_test.c", "capi_test");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

/// Finding 15: a program compiled against the frozen ABI-1 header keeps running against this
/// library (its structs have that header's sizes, its calls their meaning).
#[test]
fn finding_15_abi1_program_runs_against_this_library() {
    let out = compile_and_run("tests/c/abi1_test.c", "abi1_test");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn c_quickstart_trains() {
    let out = compile_and_run("examples/c/quickstart.c", "quickstart");
    assert!(out.contains("ok: loss"), "{out}");
}

#[test]
fn cpp_wrapper_test_program() {
    let out = compile_and_run("tests/cpp/samopt_test.cpp", "samopt_test_cpp");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}
