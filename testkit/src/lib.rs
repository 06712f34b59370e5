//! # bpftime-testkit
//!
//! Test support shared by the VM and JIT test suites: the bpf_conformance vectors
//! (`../shared/conformance/vectors.json` beside the checkout, or `$BPF_CONFORMANCE_DIR`),
//! decoded once here instead of in every suite (a missing file panics: a conformance test never
//! passes silently), and the differential tests' random program generator ([`programs`]).
#![forbid(unsafe_code)]

pub mod programs;

use std::path::PathBuf;

/// One conformance test, assembled.
#[derive(Debug, Clone)]
pub struct Vector {
    /// Test name (`add.data`, …).
    pub name: String,
    /// The program as little-endian instruction bytes.
    pub code: Vec<u8>,
    /// The memory block given to the program (empty when none).
    pub mem: Vec<u8>,
    /// Expected r0.
    pub result: u64,
}

/// The conformance directory: `$BPF_CONFORMANCE_DIR`, else `../shared/conformance` beside the
/// checkout.
pub fn dir() -> PathBuf {
    std::env::var_os("BPF_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/conformance"
            ))
        })
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn parse_result(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).expect("hex result"),
        None => s.parse::<i64>().map(|v| v as u64).expect("decimal result"),
    }
}

/// Every vector of `vectors.json`; panics if the file is missing or malformed.
pub fn vectors() -> Vec<Vector> {
    let path = dir().join("vectors.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("conformance vectors missing at {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid json");
    json.as_array()
        .expect("an array of vectors")
        .iter()
        .map(|v| Vector {
            name: v["name"].as_str().expect("name").to_string(),
            code: hex(v["code"].as_str().expect("code")),
            mem: hex(v["mem"].as_str().expect("mem")),
            result: parse_result(v["result"].as_str().expect("result")),
        })
        .collect()
}
