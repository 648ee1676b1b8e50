//! C and C++ programs against the generated header and the cdylib: `tests/c/capi_test.c` (numbers
//! and error paths from C), `tests/c/abi1_test.c` (against the frozen ABI-1 header in `tests/abi`)
//! and `examples/c/quickstart.c`, compiled with
//! `-std=c11 -Wall -Wextra -Werror -pedantic`, and `tests/cpp/samopt_test.cpp` through the C++
//! wrapper with `-std=c++17 -Wall -Wextra -Werror -pedantic`; linked against `libsamopt.so`, run.
//! And the shared library itself as the dynamic loader sees it: its SONAME and its exported symbols.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use samopt::capi::SAM_ABI_VERSION;

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
    // The library's SONAME is libsamopt.so.<ABI>: the name programs linked here ask the loader for
    // (scripts/build-lib.sh makes the same link; `make install` installs the versioned file).
    let soname = profile_dir.join(format!("libsamopt.so.{SAM_ABI_VERSION}"));
    if std::fs::symlink_metadata(&soname).is_err() {
        std::os::unix::fs::symlink("libsamopt.so", &soname).expect("link libsamopt.so.<ABI>");
    }
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

fn tool_output(tool: &str, args: &[&str], file: &Path) -> String {
    let out = Command::new(tool).args(args).arg(file).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} {} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The SONAME is `libsamopt.so.<SAM_ABI_VERSION>`, and a program linked with `-lsamopt` records
/// that name (not the unversioned development link) as what it needs.
#[test]
fn shared_library_is_named_by_its_abi_version() {
    let lib = cdylib_dir();
    let want = format!("libsamopt.so.{SAM_ABI_VERSION}");
    let dynamic = tool_output("readelf", &["-d", "-W"], &lib.join("libsamopt.so"));
    let soname = dynamic.lines().find(|l| l.contains("(SONAME)")).unwrap_or_else(|| panic!("no SONAME:\n{dynamic}"));
    assert!(soname.contains(&format!("[{want}]")), "SONAME is not {want}: {soname}");

    compile_and_run("examples/c/quickstart.c", "quickstart_needed");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quickstart_needed");
    let needed = tool_output("readelf", &["-d", "-W"], &exe);
    assert!(needed.lines().any(|l| l.contains("(NEEDED)") && l.contains(&format!("[{want}]"))), "{needed}");
}

/// Exactly the C API is exported: every defined dynamic symbol is a `sam_*` function a released
/// header declares, and every function the headers declare (not their inline helpers) is exported. Rust's
/// own symbols and those of the dependencies (wgpu, rayon, ...) stay inside the library.
#[test]
fn only_the_c_api_is_exported() {
    let lib = cdylib_dir();
    let listing = tool_output("nm", &["-D", "--defined-only", "-P"], &lib.join("libsamopt.so"));
    let exported: BTreeSet<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|s| s.split('@').next().unwrap().to_owned())
        .collect();
    let strays: Vec<&String> = exported.iter().filter(|s| !s.starts_with("sam_")).collect();
    assert!(strays.is_empty(), "symbols outside the C API exported: {strays:?}");

    // Today's header, and the frozen ABI-1 header: every function a released header declared stays
    // exported (sam_config_default, which today's header wraps in an inline of the same name).
    let mut declared = BTreeSet::new();
    for header in ["include/samopt.h", "tests/abi/samopt_abi1.h"] {
        let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(header)).unwrap();
        for line in header.lines() {
            if line.starts_with([' ', '#']) || line.starts_with("static") || line.starts_with("typedef") {
                continue;
            }
            if let Some(open) = line.find("sam_") {
                let name: String =
                    line[open..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if line[open + name.len()..].starts_with('(') {
                    declared.insert(name);
                }
            }
        }
    }
    assert!(declared.len() > 40, "found only {} declarations in the header", declared.len());
    assert_eq!(exported, declared, "exported symbols and the header's declarations differ");
}
