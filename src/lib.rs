//! Support code for bpftime's end-to-end tests (`tests/`) and benchmarks (`benches/`).
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bpf_conformance vectors: `BPF_CONFORMANCE_DIR`, else `../shared/conformance` beside the
/// checkout.
pub fn conformance_dir() -> PathBuf {
    std::env::var_os("BPF_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/conformance"))
}

/// True when running under CI (`CI=true`), where a missing prerequisite must fail, not skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
