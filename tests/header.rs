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

/// `sam_config_layout` reports every field of the header's `SamConfig`, in the header's order, with
/// offsets and sizes that a C compiler would give them (ascending, aligned, each after the last),
/// and a NULL count pointer or a NULL array with room is refused.
#[test]
fn config_layout_matches_the_header() {
    use samopt::capi::*;
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/samopt.h")).unwrap();
    let body = &header[..header.find("} SamConfig;").expect("SamConfig in the header")];
    let body = &body[body.rfind("typedef struct {").unwrap()..];
    let declared: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with(';') && !l.starts_with('*') && !l.starts_with("/*"))
        .map(|l| l.trim_end_matches(';').rsplit([' ', '*']).next().unwrap())
        .collect();
    assert!(declared.len() >= 35, "{declared:?}");

    let mut count = 0usize;
    assert_eq!(unsafe { sam_config_layout(std::ptr::null_mut(), 0, &mut count) }, SamStatus::SAM_OK);
    let mut fields = vec![SamConfigField { name: std::ptr::null(), offset: 0, size: 0 }; count];
    assert_eq!(unsafe { sam_config_layout(fields.as_mut_ptr(), fields.len(), &mut count) }, SamStatus::SAM_OK);
    let names: Vec<&str> =
        fields.iter().map(|f| unsafe { std::ffi::CStr::from_ptr(f.name) }.to_str().unwrap()).collect();
    assert_eq!(names, declared);

    let mut end = 0;
    for (f, name) in fields.iter().zip(&names) {
        assert!([1, 4, 8].contains(&f.size), "{name}: size {}", f.size);
        assert_eq!(f.offset % f.size, 0, "{name} misaligned at {}", f.offset);
        assert!(f.offset >= end && f.offset - end < f.size, "{name} at {} after a field ending at {end}", f.offset);
        end = f.offset + f.size;
    }
    assert_eq!(end.next_multiple_of(8), size_of::<SamConfig>());
    assert_eq!((fields[1].offset, fields[1].size), (8, 8), "rho follows struct_size");

    // Only `capacity` entries are written; bad pointers are refused.
    let mut two = [SamConfigField { name: std::ptr::null(), offset: 99, size: 99 }; 3];
    assert_eq!(unsafe { sam_config_layout(two.as_mut_ptr(), 2, &mut count) }, SamStatus::SAM_OK);
    assert_eq!((two[2].offset, count), (99, fields.len()));
    assert_eq!(
        unsafe { sam_config_layout(two.as_mut_ptr(), 2, std::ptr::null_mut()) },
        SamStatus::SAM_ERR_NULL_POINTER
    );
    assert_eq!(unsafe { sam_config_layout(std::ptr::null_mut(), 1, &mut count) }, SamStatus::SAM_ERR_NULL_POINTER);
    let msg = unsafe { std::ffi::CStr::from_ptr(sam_last_error()) }.to_string_lossy().into_owned();
    assert!(msg.contains("out_fields"), "{msg}");
}
