//! `include/samopt.h` is generated from `src/capi` by cbindgen and committed; this test fails when
//! the committed header differs from what the source generates now.
//!
//! To regenerate: `SAMOPT_BLESS=1 cargo test --test header`.

use std::path::Path;

#[test]
fn header_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("header is UTF-8");

    let path = root.join("include/samopt.h");
    if std::env::var_os("SAMOPT_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/samopt.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/samopt.h is stale: regenerate it with `SAMOPT_BLESS=1 cargo test --test header`"
    );
}
