//! Runs all bpf_conformance vectors (`../shared/conformance/vectors.json`) on the interpreter.
//!
//! The vectors live beside the repository (`/work/shared` on the team's machines); set
//! `BPF_CONFORMANCE_DIR` to point elsewhere. A missing directory fails the test: it never passes
//! silently.

use bpftime_vm::helper::conformance_helpers;
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::isa::insns_from_bytes;
use bpftime_vm::verifier::verify;

#[test]
fn interpreter_passes_all_313_conformance_vectors() {
    let vectors = bpftime_testkit::vectors();
    let helpers = conformance_helpers();
    let mut failures = Vec::new();
    for v in &vectors {
        let name = &v.name;
        let insns = insns_from_bytes(&v.code).unwrap();
        let mut mem = v.mem.clone();
        let expected = v.result;
        let prog = match verify(&insns, &helpers) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{name}: rejected: {e}"));
                continue;
            }
        };
        match Interpreter::new(&prog, &helpers).run(&mut mem) {
            Ok(r0) if r0 == expected => {}
            Ok(r0) => failures.push(format!(
                "{name}: r0 = {r0:#x}, expected {expected:#x}\n{}",
                bpftime_vm::disasm::disassemble(&insns)
            )),
            Err(t) => failures.push(format!(
                "{name}: {t} at `{}`",
                bpftime_vm::disasm::disassemble_at(&insns, t.pc)
            )),
        }
    }
    assert_eq!(vectors.len(), 313, "expected the full suite");
    assert!(
        failures.is_empty(),
        "{} of {} conformance vectors failed:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
    println!(
        "conformance: {}/{} passed on the interpreter",
        vectors.len(),
        vectors.len()
    );
}

/// Every `unused-*` negative vector (non-zero unused fields) is rejected by the loader checks,
/// at pc 0, with a reason naming the offending field.
#[test]
fn loader_rejects_every_unused_field_vector() {
    let dir = bpftime_testkit::dir().join("negative");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("unused-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let raw: String = text
            .split("-- raw")
            .nth(1)
            .and_then(|r| r.split("--").next())
            .unwrap_or_else(|| panic!("{name}: no raw section"))
            .to_string();
        let insns = bpftime_vm::asm::parse_raw_words(&raw).unwrap();
        let err =
            verify(&insns, &conformance_helpers()).expect_err(&format!("{name} must be rejected"));
        assert_eq!(err.pc, 0, "{name}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains("unused field") || msg.contains("invalid"),
            "{name}: {msg}"
        );
        n += 1;
    }
    assert_eq!(n, 45, "all unused-* vectors present");
}
