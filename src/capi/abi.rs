//! The C ABI's version, in a file of its own because `build.rs` reads it too: the shared
//! library's SONAME is `libsamopt.so.<SAM_ABI_VERSION>`, so the number the header states, the
//! number `sam_abi_version()` returns and the name the dynamic loader looks for cannot disagree.

/// Version of the C ABI: bumped on any incompatible change to a signature or struct layout.
/// Compare `sam_abi_version()` with `SAM_ABI_VERSION` from the header you compiled against.
///
/// What bumps it: removing or renaming a function, changing a parameter or return type, changing
/// the meaning of a status, constant or field, or reordering or removing a field of a struct.
/// What does not: a new function, a new status or enum value, a new field at the end of
/// `SamConfig` or `SamAdapterInfo` (both carry `struct_size`, and the library accepts every
/// released layout). A bump renames the shared library's SONAME (`libsamopt.so.<ABI>`), so
/// programs linked against the old ABI keep loading the old library.
pub const SAM_ABI_VERSION: u32 = 1;
