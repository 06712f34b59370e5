//! The assembler and disassembler against the bpf_conformance suite: every test assembles to
//! the bytes in `vectors.json`, every program survives disassemble → assemble unchanged, and
//! every negative vector is rejected by the assembler or by `isa::decode`.
//!
//! The suite is looked up in `$BPF_CONFORMANCE_DIR`, else `../../shared/conformance` from this
//! crate. A missing suite fails the tests: it is a prerequisite, not an optional extra.

use bpftime_vm::asm::{AsmErrorKind, assemble, parse_raw_words};
use bpftime_vm::disasm::disassemble;
use bpftime_vm::isa::{Insn, decode, insns_to_bytes};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

fn suite_dir() -> PathBuf {
    std::env::var_os("BPF_CONFORMANCE_DIR").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/conformance"
            ))
        },
        PathBuf::from,
    )
}

/// `.data` files of a suite directory, sorted by name.
fn data_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("conformance suite missing at {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The sections of a `.data` test file the assembler cares about.
#[derive(Debug, Default)]
struct TestFile {
    asm: Option<String>,
    raw: Option<String>,
}

/// Splits a test file into sections, rejecting unknown `-- directives` as the reference
/// runner does.
fn parse_test_file(text: &str) -> Result<TestFile, String> {
    const IGNORED: [&str; 5] = ["mem", "result", "error", "c", "no register offset"];
    let mut file = TestFile::default();
    let mut current: Option<&mut String> = None;
    for line in text.lines() {
        if let Some(directive) = line.strip_prefix("--") {
            current = match directive.trim() {
                "asm" => Some(file.asm.insert(String::new())),
                "raw" => Some(file.raw.insert(String::new())),
                d if IGNORED.contains(&d) => None,
                d => return Err(format!("unknown directive {d:?}")),
            };
            continue;
        }
        if let Some(section) = current.as_deref_mut() {
            section.push_str(line);
            section.push('\n');
        }
    }
    Ok(file)
}

/// The program of a test file: its `-- asm` section, or its `-- raw` words when it has none.
fn program(file: &TestFile) -> Result<Vec<Insn>, String> {
    match (&file.asm, &file.raw) {
        (Some(asm), _) => assemble(asm).map_err(|e| e.to_string()),
        (None, Some(raw)) => parse_raw_words(raw).map_err(|e| e.to_string()),
        (None, None) => Err("no -- asm or -- raw section".into()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `vectors.json`: test name → expected code as hex.
fn reference_code() -> HashMap<String, String> {
    let path = suite_dir().join("vectors.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("vectors.json is JSON");
    json.as_array()
        .expect("vectors.json is an array")
        .iter()
        .map(|t| {
            let field = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            (field("name"), field("code"))
        })
        .collect()
}

/// Every positive test file with its program.
fn positive_programs() -> Vec<(String, Vec<Insn>)> {
    let files = data_files(&suite_dir().join("tests"));
    let mut failures = Vec::new();
    let programs: Vec<(String, Vec<Insn>)> = files
        .iter()
        .filter_map(|path| {
            let name = file_name(path);
            let text = fs::read_to_string(path).expect("readable test file");
            match parse_test_file(&text).and_then(|f| program(&f)) {
                Ok(insns) => Some((name, insns)),
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    None
                }
            }
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    programs
}

#[test]
fn every_conformance_test_assembles_to_the_reference_bytes() {
    let reference = reference_code();
    let programs = positive_programs();
    assert_eq!(programs.len(), 313);
    let mut failures = Vec::new();
    for (name, insns) in &programs {
        let got = hex(&insns_to_bytes(insns));
        match reference.get(name) {
            Some(want) if *want == got => {}
            Some(want) => failures.push(format!("{name}:\n  got  {got}\n  want {want}")),
            None => failures.push(format!("{name}: not in vectors.json")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        programs.len(),
        failures.join("\n")
    );
}

#[test]
fn raw_section_matches_asm_section() {
    let mut checked = 0;
    for path in data_files(&suite_dir().join("tests")) {
        let text = fs::read_to_string(&path).expect("readable test file");
        let file = parse_test_file(&text).expect("test file parses");
        if let (Some(asm), Some(raw)) = (&file.asm, &file.raw) {
            assert_eq!(parse_raw_words(raw), assemble(asm), "{}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 1, "no test has both -- asm and -- raw");
}

#[test]
fn disassembly_reassembles_to_identical_slots() {
    let programs = positive_programs();
    assert_eq!(programs.len(), 313);
    for (name, insns) in &programs {
        let text = disassemble(insns);
        // Every conformance program decodes fully: no `.raw` fallback lines.
        assert!(!text.contains(".raw"), "{name}:\n{text}");
        assert_eq!(assemble(&text).as_ref(), Ok(insns), "{name}:\n{text}");
    }
}

/// How the negative vectors are rejected, by file name.
#[derive(Debug, PartialEq)]
enum Rejection {
    /// The test file itself is malformed (unknown directive) or holds no program.
    TestFile,
    /// `assemble` returns an error.
    Assembler,
    /// Assembles (or parses as raw), but some slot does not decode.
    Decode,
}

/// Why a negative vector's program is not runnable, or `None` when it is.
fn rejection(text: &str) -> Option<Rejection> {
    let Ok(file) = parse_test_file(text) else {
        return Some(Rejection::TestFile);
    };
    if file.asm.is_none() && file.raw.is_none() {
        return Some(Rejection::TestFile);
    }
    let insns = match (&file.asm, &file.raw) {
        (Some(asm), _) => match assemble(asm) {
            Ok(insns) => insns,
            Err(_) => return Some(Rejection::Assembler),
        },
        (None, Some(raw)) => parse_raw_words(raw).expect("-- raw words parse"),
        (None, None) => unreachable!(),
    };
    if insns.is_empty() {
        return Some(Rejection::TestFile);
    }
    (0..insns.len())
        .any(|pc| decode(&insns, pc).is_err() && !is_lddw_second_slot(&insns, pc))
        .then_some(Rejection::Decode)
}

/// Whether `pc` is the second slot of a well-formed `lddw` (which does not decode on its own).
fn is_lddw_second_slot(insns: &[Insn], pc: usize) -> bool {
    pc > 0 && decode(insns, pc - 1).is_ok_and(|op| op.slots() == 2)
}

#[test]
fn every_negative_vector_is_rejected() {
    let dir = suite_dir().join("negative");
    let files = data_files(&dir);
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    for path in &files {
        let name = file_name(path);
        let text = fs::read_to_string(path).expect("readable negative vector");
        let expected = if name.starts_with("unused-") {
            Some(Rejection::Decode)
        } else if name.starts_with("empty") || name == "invalid_unknown_directive.data" {
            Some(Rejection::TestFile)
        } else if name.starts_with("invalid_") {
            Some(Rejection::Assembler)
        } else {
            // error.data (`or %r0, %r10`: reads r0 before it is written, a verifier-level
            // rejection) and incorrect_return_value_high_bits.data (a valid program whose
            // stated result is wrong) are well-formed programs.
            None
        };
        let got = rejection(&text);
        if got != expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn assembler_negative_vectors_fail_for_the_stated_reason() {
    let dir = suite_dir().join("negative");
    let kind_of = |name: &str| {
        let text = fs::read_to_string(dir.join(name)).expect("readable negative vector");
        let file = parse_test_file(&text).expect("test file parses");
        assemble(file.asm.as_deref().unwrap_or_default())
            .expect_err(name)
            .kind
    };
    assert!(matches!(
        kind_of("invalid_imm32_dec_range.data"),
        AsmErrorKind::OutOfRange { bits: 32, .. }
    ));
    assert!(matches!(
        kind_of("invalid_imm32_hex_range.data"),
        AsmErrorKind::OutOfRange { bits: 32, .. }
    ));
    assert!(matches!(
        kind_of("invalid_offset_range.data"),
        AsmErrorKind::OutOfRange { bits: 16, .. }
    ));
    assert!(matches!(
        kind_of("invalid_label.data"),
        AsmErrorKind::UndefinedLabel { .. }
    ));
    assert!(matches!(
        kind_of("invalid_lock.data"),
        AsmErrorKind::OperandCount { found: 1, .. }
    ));
    assert!(matches!(
        kind_of("invalid_lock2.data"),
        AsmErrorKind::LockWithoutOperation
    ));
    assert!(matches!(
        kind_of("invalid_mnemonic.data"),
        AsmErrorKind::UnknownMnemonic { .. }
    ));
    assert!(matches!(
        kind_of("invalid_offset.data"),
        AsmErrorKind::InvalidMemoryOperand { .. }
    ));
    assert!(matches!(
        kind_of("invalid_operand_count.data"),
        AsmErrorKind::OperandCount {
            expected: 2,
            found: 1,
            ..
        }
    ));
    assert!(matches!(
        kind_of("invalid_register.data"),
        AsmErrorKind::InvalidRegister { .. }
    ));
}

#[test]
fn error_messages_name_the_line() {
    let cases = [
        (
            "mov %r0, 1\nfoo %r0\nexit",
            "line 2: unknown mnemonic \"foo\"",
        ),
        (
            "# header\n\nmov32 %r0, 2147483648\n",
            "line 3: immediate 2147483648 does not fit in 32 bits",
        ),
        ("exit\nor %r0, %r50", "line 2: invalid register \"%r50\""),
        ("ja done\nexit\n", "line 1: undefined label \"done\""),
        (
            "mov %r0, 0\nexit\nlddw %r0",
            "line 3: \"lddw\" takes 2 operand(s), found 1",
        ),
        (
            "ldxb %r0, [%r1+0x10000]",
            "line 1: offset +0x10000 does not fit in 16 bits",
        ),
    ];
    for (text, message) in cases {
        let err = assemble(text).expect_err(text);
        assert_eq!(err.to_string(), message);
    }
}
